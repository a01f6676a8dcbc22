"""KubeRay manifests rendered from a TrainingPlan: a ConfigMap (training config + plan JSON) and a
`ray.io/v1` RayJob (or a RayCluster for interactive use).

The head group has no GPUs. Each NodePlan becomes one worker group: one pod per node holding all of
that node's GPUs, pinned to the GPU product with a node selector, carrying the Ray node label
`rayquant.io/node-type=<node_type_label_value(node_type)>` that rayquant's worker placement selects
on (Ray also labels the node `ray.io/accelerator-type` and adds the `accelerator_type:<TYPE>` resource
by itself from NVML). Usage:

    docs = render_manifests(plan, train_config, K8sOptions(name="ft", image="my/image:tag",
                                                         storage="rayquant-pvc"))
    planner.atomic.write_atomically("rayjob.yaml", dump_yaml(docs))
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Mapping

from planner.hardware import GIB, GpuSpec, lookup_gpu
from planner.plan import NodePlan, PlanError, TrainingPlan
# The Ray node label workers are pinned by, and its value per node type: one definition, shared
# with the placement that selects on it.
from rayquant.placement import CPU_DEVICE, NODE_TYPE_LABEL, node_type_label_value

__all__ = ["K8sError", "K8sOptions", "NODE_TYPE_LABEL", "node_type_label_value", "gpu_label_values",
           "worker_pod_size", "render_manifests", "dump_yaml"]

GFD_PRODUCT_LABEL = "nvidia.com/gpu.product"
CONFIG_MOUNT_DIR = "/etc/rayquant"
STORAGE_MOUNT_DIR = "/mnt/rayquant"
TRAIN_CONFIG_FILE = "train.yaml"
PLAN_FILE = "plan.json"
DEFAULT_RAY_VERSION = "2.60.0"  # the Ray the `train` extra pins (pyproject.toml)
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "SidecarMode")
STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")
GPU_RESOURCE = "nvidia.com/gpu"
# KubeRay utils/constant.go: MaxRayClusterNameLength = 53 (63 minus "-serve-svc"); a RayJob's
# cluster name appends 6 characters, so MaxRayJobNameLength = 47.
MAX_RAYJOB_NAME = 47
MAX_RAYCLUSTER_NAME = 53
CONFIGMAP_LIMIT_BYTES = 1024 * 1024  # Kubernetes rejects ConfigMaps over 1 MiB of data
# A local dataset up to this size travels in the ConfigMap (leaving room for config and plan);
# larger ones must be on the shared storage or in the image.
DATASET_EMBED_LIMIT_BYTES = 512 * 1024

# --- pod sizing terms ------------------------------------------------------------------------
# CPUs: what Ray Train reserves per worker (the config's scaling.cpus_per_worker, default 1, which
# rayquant.placement puts into resources_per_worker) plus one per worker for tokenization and batch
# collation in the same process tree, plus one per pod for the raylet, dashboard agent and log
# monitor. Kept small so 1-GPU cloud nodes (4 vCPUs, e.g. g5.xlarge) fit after kubelet reservations.
DATA_CPUS_PER_WORKER = 1
RAY_SYSTEM_CPUS = 1
# Host memory per worker process: the CUDA context's host side plus torch, transformers, TRL and
# Unsloth imported (~3 GiB RSS measured for such a process), the tokenized dataset shard and
# DataLoader buffers; rounded up.
WORKER_PROCESS_BYTES = 6 * GIB
# Loading reads one safetensors shard at a time into host memory before it moves to the GPU; hub
# checkpoints were mostly saved with transformers 4.x's default max_shard_size="5GB".
CHECKPOINT_SHARD_BYTES = 5 * 10**9
# raylet + GCS client + dashboard agent + log monitor RSS on a worker pod, rounded up.
RAY_SYSTEM_BYTES = 2 * GIB
# The head runs the driver (`rayquant train`: config, plan, adapter gathering) and the GCS/dashboard.
HEAD_CPUS = 4
HEAD_MEMORY_BYTES = 16 * GIB

# GPU product label values per labelling scheme. GPU feature discovery (NVIDIA k8s-device-plugin,
# internal/lm/resource.go) publishes the NVML device name with spaces replaced by '-', so those come
# from GpuSpec.nvml_names. Cloud labels are tables:
# GKE: cloud.google.com/gke-accelerator values, https://cloud.google.com/kubernetes-engine/docs/how-to/gpus
GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
# Keys are GPU catalog names (planner/catalog_gpus.py); A3 and A3 Mega machines both carry the
# H100 80GB HBM3 board under two label values.
GKE_ACCELERATORS = {
    "B200": ("nvidia-b200",), "H200": ("nvidia-h200-141gb",),
    "H100-80GB": ("nvidia-h100-80gb", "nvidia-h100-mega-80gb"), "A100-80GB": ("nvidia-a100-80gb",),
    "A100-40GB": ("nvidia-tesla-a100",), "L4": ("nvidia-l4",), "T4": ("nvidia-tesla-t4",),
    "V100-16GB": ("nvidia-tesla-v100",),
}
# Karpenter on AWS: karpenter.k8s.aws/instance-gpu-name is the lower-case GPU model without memory
# size ("a10g", "h100", "l40s", "t4"), https://karpenter.sh/docs/reference/instance-types/
KARPENTER_GPU_LABEL = "karpenter.k8s.aws/instance-gpu-name"
KNOWN_GPU_LABELS = (GFD_PRODUCT_LABEL, GKE_ACCELERATOR_LABEL, KARPENTER_GPU_LABEL)

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_HF_TOKEN = re.compile(r"^hf_[A-Za-z0-9]{20,}$")
_TOKEN_KEYS = {"token", "hf_token", "hub_token", "huggingface_token", "hf_hub_token", "use_auth_token"}


class K8sError(ValueError):
    """Bad input for rendering manifests: the message says what is wrong and how to fix it."""


def _group_name(node_type: str) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", node_type_label_value(node_type).lower()).strip("-")
    if not name:
        raise K8sError(f"node type {node_type!r} gives no usable worker group name")
    return name


def gpu_label_values(gpu: GpuSpec, label_key: str = GFD_PRODUCT_LABEL,
                     overrides: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The node-label values that select nodes with this GPU under `label_key`'s scheme."""
    if overrides and gpu.name in overrides:
        return (overrides[gpu.name],)
    if label_key == GFD_PRODUCT_LABEL:
        values = tuple(dict.fromkeys(n.strip().replace(" ", "-") for n in gpu.nvml_names))
        if values:
            return values
    elif label_key == GKE_ACCELERATOR_LABEL and gpu.name in GKE_ACCELERATORS:
        return GKE_ACCELERATORS[gpu.name]
    elif label_key == KARPENTER_GPU_LABEL and not gpu.generic and not gpu.name.startswith("RTX"):
        return (gpu.name.split("-")[0].lower(),)
    known = (f"{label_key} has no value for {gpu.name} in rayquant's tables"
             if label_key in KNOWN_GPU_LABELS else f"{label_key} is not a label rayquant knows "
             f"(known: {', '.join(KNOWN_GPU_LABELS)})")
    raise K8sError(f"{known}. To fix: give the value your nodes carry, e.g. "
                   f"--gpu-value {gpu.name}=<label value> (see `kubectl get nodes -L {label_key}`)")


@dataclass(frozen=True)
class PodSize:
    """Container requests (= limits) of one pod, and each term that went into them."""

    cpus: int
    memory_bytes: int
    gpus: int
    terms_bytes: Mapping[str, int] = field(default_factory=dict)

    @property
    def memory_gib(self) -> int:
        return math.ceil(self.memory_bytes / GIB)


def worker_pod_size(node: NodePlan, cpus_per_worker: int = 1) -> PodSize:
    """CPUs and host memory of one worker pod (one Kubernetes node of this node type);
    `cpus_per_worker` is what Ray Train reserves per worker (scaling.cpus_per_worker)."""
    workers = node.workers_per_node
    terms = {
        "ray_system": RAY_SYSTEM_BYTES,
        "worker_processes": workers * WORKER_PROCESS_BYTES,
        "checkpoint_shard_staging": workers * CHECKPOINT_SHARD_BYTES,
        # The planner's host RAM per worker: offloaded activations, paged optimizer states.
        "plan_host_memory": workers * node.host_memory_bytes,
    }
    return PodSize(cpus=workers * (cpus_per_worker + DATA_CPUS_PER_WORKER) + RAY_SYSTEM_CPUS,
                   memory_bytes=sum(terms.values()),
                   gpus=0 if node.gpu == CPU_DEVICE else node.gpus_per_node, terms_bytes=terms)


def head_pod_size() -> PodSize:
    return PodSize(cpus=HEAD_CPUS, memory_bytes=HEAD_MEMORY_BYTES, gpus=0,
                   terms_bytes={"driver_and_gcs": HEAD_MEMORY_BYTES})


@dataclass(frozen=True)
class Storage:
    """Where checkpoints and the adapter go: a PersistentVolumeClaim mounted on every pod, or a URI."""

    pvc: str | None = None
    uri: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Storage":
        text = text.strip()
        if "://" in text:
            scheme = text.split("://", 1)[0].lower()
            if scheme not in STORAGE_SCHEMES:
                raise K8sError(f"--storage {text}: scheme {scheme!r} is not shared storage Ray Train "
                               f"can write from every pod. To fix: use one of "
                               f"{', '.join(s + '://' for s in STORAGE_SCHEMES)}, or a PVC name")
            return cls(uri=text.rstrip("/"))
        if not _DNS1123_LABEL.match(text) or len(text) > 253:
            raise K8sError(f"--storage {text!r} is neither a URI nor a valid PVC name (lower-case "
                           "letters, digits and '-'). To fix: pass an existing ReadWriteMany "
                           "PersistentVolumeClaim (--storage my-pvc) or a bucket URI "
                           "(--storage s3://bucket/prefix)")
        return cls(pvc=text)

    @property
    def storage_path(self) -> str:
        return self.uri if self.uri else STORAGE_MOUNT_DIR


@dataclass(frozen=True)
class K8sOptions:
    """What the cluster needs beyond the plan: names, image, storage, secrets and job policy."""

    name: str
    image: str
    storage: str
    namespace: str = "default"
    hf_token_secret: str | None = None  # "NAME" or "NAME:KEY" (key defaults to HF_TOKEN)
    gpu_label: str = GFD_PRODUCT_LABEL
    gpu_values: Mapping[str, str] = field(default_factory=dict)  # GPU catalog name -> label value
    cluster: bool = False  # render a RayCluster instead of a RayJob
    dataset_in_pod: str | None = None  # the dataset's path inside the pods; None: ship it
    ray_version: str = DEFAULT_RAY_VERSION
    pip: tuple[str, ...] = ()  # packages the job's runtime_env adds (runtimeEnvYAML)
    submission_mode: str = "K8sJobMode"
    backoff_limit: int = 1
    active_deadline_seconds: int = 24 * 3600
    ttl_seconds_after_finished: int = 600

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu_values", dict(self.gpu_values))
        object.__setattr__(self, "pip", tuple(self.pip))
        problems: list[str] = []
        limit = MAX_RAYCLUSTER_NAME if self.cluster else MAX_RAYJOB_NAME
        if not _DNS1035_LABEL.match(self.name) or len(self.name) > limit:
            problems.append(f"--name {self.name!r} must be a DNS-1035 label of at most {limit} "
                            "characters (lower-case letters, digits, '-', starting with a letter)")
        if not _DNS1123_LABEL.match(self.namespace) or len(self.namespace) > 63:
            problems.append(f"--namespace {self.namespace!r} is not a valid namespace name")
        if not self.image.strip() or any(c.isspace() for c in self.image):
            problems.append(f"--image {self.image!r} must be a container image reference")
        if self.hf_token_secret is not None:
            secret, _, key = self.hf_token_secret.partition(":")
            if not _DNS1123_LABEL.match(secret) or len(secret) > 253:
                problems.append(f"--hf-token-secret {self.hf_token_secret!r}: {secret!r} is not a "
                                "Secret name (expected NAME or NAME:KEY)")
            if key and not re.match(r"^[-._A-Za-z0-9]+$", key):
                problems.append(f"--hf-token-secret {self.hf_token_secret!r}: {key!r} is not a "
                                "Secret key")
            if _HF_TOKEN.match(secret) or _HF_TOKEN.match(key):
                problems.append("--hf-token-secret takes the NAME of a Secret holding the token, "
                                "never the token itself")
        if not _QUALIFIED_NAME.match(self.gpu_label):
            problems.append(f"--gpu-label {self.gpu_label!r} is not a Kubernetes label key")
        for gpu, value in self.gpu_values.items():
            if not _LABEL_VALUE.match(value) or len(value) > 63:
                problems.append(f"--gpu-value {gpu}={value!r} is not a valid label value")
        if self.submission_mode not in SUBMISSION_MODES:
            problems.append(f"submission mode {self.submission_mode!r} is not one of "
                            f"{', '.join(SUBMISSION_MODES)}")
        for what, value, low in (("backoff limit", self.backoff_limit, 0),
                                 ("active deadline seconds", self.active_deadline_seconds, 1),
                                 ("TTL seconds after finished", self.ttl_seconds_after_finished, 0)):
            if value < low:
                problems.append(f"{what} must be >= {low}, got {value}")
        if self.dataset_in_pod is not None and not self.dataset_in_pod.startswith("/"):
            problems.append(f"--dataset-in-pod {self.dataset_in_pod!r} must be an absolute path "
                            "inside the pods")
        try:
            Storage.parse(self.storage)
        except K8sError as e:
            problems.append(str(e))
        if problems:
            raise K8sError("cannot render manifests: " + "; ".join(problems))

    @property
    def secret_ref(self) -> tuple[str, str] | None:
        if self.hf_token_secret is None:
            return None
        secret, _, key = self.hf_token_secret.partition(":")
        return secret, key or "HF_TOKEN"


def default_name(model: str) -> str:
    """A RayJob name from a model id: "meta-llama/Llama-3.1-8B" -> "rayquant-llama-3-1-8b"."""
    base = re.sub(r"[^a-z0-9]+", "-", model.rstrip("/").split("/")[-1].lower()).strip("-")
    return ("rayquant-" + base)[:MAX_RAYJOB_NAME].rstrip("-") if base else "rayquant"


def check_no_inline_token(config: Any, where: str = "config") -> None:
    """Refuse a training config that carries a Hugging Face token: ConfigMaps are not secret."""
    if isinstance(config, Mapping):
        for key, value in config.items():
            if (str(key).lower() in _TOKEN_KEYS and isinstance(value, str) and value.strip()) or \
                    (isinstance(value, str) and _HF_TOKEN.match(value.strip())):
                raise K8sError(f"{where}.{key} holds a Hugging Face token, which would land in a "
                               "ConfigMap in plain text. To fix: remove it from the config, store "
                               "it in a Secret (kubectl create secret generic hf-token "
                               "--from-literal=HF_TOKEN=...) and pass --hf-token-secret hf-token")
            check_no_inline_token(value, f"{where}.{key}")
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            check_no_inline_token(value, f"{where}[{i}]")


def entrypoint(config_dir: str = CONFIG_MOUNT_DIR) -> str:
    """The job's command: `rayquant train` on the mounted config (whose `plan:` is the mounted plan)."""
    return f"rayquant train {shlex.quote(config_dir + '/' + TRAIN_CONFIG_FILE)}"


def _embedded_dataset(train_config: Mapping[str, Any], config_dir: str,
                      dataset_in_pod: str | None) -> tuple[str, dict[str, str], dict[str, str]]:
    """(dataset path in the pods, ConfigMap data, ConfigMap binaryData) for the config's dataset.

    A small local dataset travels in the ConfigMap; a large one must already be where the pods can
    read it (the shared storage or the image), named with `dataset_in_pod`.
    """
    if dataset_in_pod:
        return dataset_in_pod, {}, {}
    given = train_config.get("dataset")
    if not isinstance(given, str) or not given:
        raise K8sError("the training config has no `dataset`. To fix: add `dataset: PATH` (a "
                       "JSON/JSONL/Parquet file), or pass --dataset-in-pod PATH")
    path = os.path.expanduser(given)
    path = path if os.path.isabs(path) else os.path.join(config_dir, path)
    if not os.path.isfile(path):
        raise K8sError(f"dataset {path} does not exist here, so it cannot be shipped to the pods. "
                       "To fix: fix `dataset:` in the config, or, if the file is already on the "
                       "shared storage or in the image, pass --dataset-in-pod /path/in/the/pods")
    size = os.path.getsize(path)
    if size > DATASET_EMBED_LIMIT_BYTES:
        raise K8sError(f"dataset {path} is {size / 2**20:.1f} MiB, too big for a ConfigMap (at most "
                       f"{DATASET_EMBED_LIMIT_BYTES // 1024} KiB travel with the manifest). To fix: "
                       f"copy it to the shared storage (e.g. {STORAGE_MOUNT_DIR}/data/) or into the "
                       "image and pass --dataset-in-pod /path/in/the/pods")
    ext = os.path.splitext(path)[1].lower()
    key = "dataset" + (ext if re.match(r"^\.[a-z0-9]+$", ext) else "")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return f"{CONFIG_MOUNT_DIR}/{key}", {key: raw.decode("utf-8")}, {}
    except UnicodeDecodeError:
        return f"{CONFIG_MOUNT_DIR}/{key}", {}, {key: base64.b64encode(raw).decode("ascii")}


def mounted_config(train_config: Mapping[str, Any], plan: TrainingPlan, options: K8sOptions,
                   dataset_path: str) -> dict[str, Any]:
    """The `rayquant train` config as the pods see it (schema: rayquant/config.py).

    The plan is the mounted plan JSON, results go to the shared storage, the Ray address is the one
    KubeRay gives the entrypoint (RAY_ADDRESS), and the run is named after the job.
    """
    config = dict(train_config)
    given = config.get("model")
    if given not in (None, plan.model):
        raise K8sError(f"the config's model {given!r} differs from the plan's {plan.model!r}. To "
                       "fix: drop --model or make it match the config's `model`")
    config["model"] = plan.model
    config["dataset"] = dataset_path
    config["plan"] = f"{CONFIG_MOUNT_DIR}/{PLAN_FILE}"
    config["address"] = None
    scaling = dict(config.get("scaling") or {})
    scaling.pop("gpus", None)  # the plan, not a described cluster, decides the workers
    if scaling:
        config["scaling"] = scaling
    else:
        config.pop("scaling", None)
    run = dict(config.get("run") or {})
    run["name"] = run.get("name") or options.name
    run["storage_path"] = Storage.parse(options.storage).storage_path
    run.pop("output_dir", None)  # default <storage_path>/<name>/adapter: on the shared storage
    config["run"] = run
    return config


def job_spec_from_config(train_config: Mapping[str, Any]):
    """The planner's JobSpec from a `rayquant train` config's lora/sft sections (as the trainer
    builds it: RayQuantTrainer.job_spec)."""
    from planner.plan import JobSpec
    from rayquant.config import ConfigError, coerce_options

    problems: list[str] = []
    lora = coerce_options("lora", train_config.get("lora"), problems)
    sft = coerce_options("sft", train_config.get("sft"), problems)
    problems += lora.problems() + sft.problems()
    if problems:
        raise ConfigError(problems, "training config")
    return JobSpec(seq_len=sft.seq_len, global_batch_size=sft.global_batch_size, lora_rank=lora.rank,
                   lora_alpha=lora.effective_alpha, lora_dropout=lora.dropout,
                   lora_targets=lora.targets, prefer=sft.prefer, backend=sft.backend,
                   quantization=sft.quantization, optimizer=sft.optimizer,
                   micro_batch_size=sft.micro_batch_size,
                   gradient_checkpointing=sft.gradient_checkpointing)


def plan_for(train_config: Mapping[str, Any], model: str | None = None, gpus: str | None = None,
             inventory: str | None = None, plan_path: str | None = None) -> TrainingPlan:
    """The plan to render: loaded from `plan_path`, or made for the cluster `gpus` / `inventory`
    describes, for `model` (default: the config's) and the config's LoRA/SFT settings."""
    given = [flag for flag, value in (("--gpus", gpus), ("--inventory", inventory),
                                      ("--plan", plan_path)) if value]
    if len(given) != 1:
        raise K8sError(("--gpus, --inventory and --plan exclude each other (got " + ", ".join(given)
                        + ")" if given else "no cluster given") + ". To fix: describe the cluster "
                       "with --gpus 2x8xH100-80GB,4x1xA10G or --inventory nodes.yaml, or pass a "
                       "plan from `rayquant plan --json` with --plan plan.json")
    model = model or train_config.get("model")
    if plan_path:
        plan = TrainingPlan.load(plan_path)
        if model and model != plan.model:
            raise K8sError(f"--plan {plan_path} is for {plan.model!r}, not {model!r}. To fix: "
                           "re-plan for this model or drop --model")
        return plan
    if not isinstance(model, str) or not model:
        raise K8sError("no model: pass --model or set `model:` in the config")
    from planner.hardware import parse_gpu_spec
    from planner.model import load_model_spec
    from planner.search import make_plan
    from rayquant.trainer import _model_config_path

    if gpus:
        node_types = parse_gpu_spec(gpus)
    else:
        from rayquant.inventory import load_inventory_file

        node_types = load_inventory_file(inventory)
    spec = load_model_spec(_model_config_path(model))
    plan = make_plan(spec, node_types, job_spec_from_config(train_config))
    return dataclasses.replace(plan, model=model)


def _yaml():
    import yaml

    return yaml


def _container(role: str, image: str, size: PodSize, env: list[dict], mounts: list[dict]) -> dict:
    resources: dict[str, Any] = {"cpu": str(size.cpus), "memory": f"{size.memory_gib}Gi"}
    if size.gpus:
        resources[GPU_RESOURCE] = str(size.gpus)
    container: dict[str, Any] = {
        "name": f"ray-{role}", "image": image, "imagePullPolicy": "IfNotPresent",
        # Requests equal limits: Ray sizes itself from the limits, and guaranteed memory keeps the
        # pod from being the kubelet's first eviction choice under node pressure.
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": mounts,
    }
    if env:
        container["env"] = env
    if role == "head":
        container["ports"] = [{"containerPort": 6379, "name": "gcs"},
                              {"containerPort": 8265, "name": "dashboard"},
                              {"containerPort": 10001, "name": "client"}]
    return container


def _pod_template(role: str, options: K8sOptions, size: PodSize, env: list[dict],
                  volumes: list[dict], mounts: list[dict], node: NodePlan | None,
                  selector_values: tuple[str, ...]) -> dict:
    labels = {"app.kubernetes.io/name": "rayquant", "app.kubernetes.io/instance": options.name,
              "app.kubernetes.io/component": role}
    spec: dict[str, Any] = {"containers": [_container(role, options.image, size, env, mounts)],
                            "volumes": volumes}
    if node is not None:
        labels[NODE_TYPE_LABEL] = node_type_label_value(node.node_type)
    if selector_values:
        if len(selector_values) == 1:
            spec["nodeSelector"] = {options.gpu_label: selector_values[0]}
        else:
            # One catalog GPU with several product names (e.g. SXM and PCIe boards): any of them.
            spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": options.gpu_label, "operator": "In", "values": list(selector_values)}]}]}}}
        spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": labels}, "spec": spec}


def _worker_group(node: NodePlan, options: K8sOptions, cpus_per_worker: int, env: list[dict],
                  volumes: list[dict], mounts: list[dict]) -> dict:
    if node.gpu == CPU_DEVICE:
        values: tuple[str, ...] = ()
    else:
        try:
            gpu = lookup_gpu(node.gpu)
        except PlanError as e:
            raise K8sError(f"node type {node.node_type}: {e}") from None
        values = gpu_label_values(gpu, options.gpu_label, options.gpu_values)
    return {
        "groupName": _group_name(node.node_type),
        "replicas": node.nodes, "minReplicas": node.nodes, "maxReplicas": node.nodes,
        # KubeRay sets these as Ray node labels (and pod labels); it rejects
        # rayStartParams['labels'] in favour of this field (utils/validation.go).
        "labels": {NODE_TYPE_LABEL: node_type_label_value(node.node_type)},
        "rayStartParams": {},
        "template": _pod_template("worker", options, worker_pod_size(node, cpus_per_worker), env,
                                  volumes, mounts, node, values),
    }


def render_manifests(plan: TrainingPlan, train_config: Mapping[str, Any], options: K8sOptions,
                     config_dir: str = ".") -> list[dict]:
    """[ConfigMap, RayJob | RayCluster] running `plan` with the `rayquant train` config given.

    `config_dir` is where the config file lives (its relative dataset path resolves against it).
    """
    if not plan.node_plans:
        raise K8sError("the plan has no node types; nothing to run")
    check_no_inline_token(train_config)
    cpus = (train_config.get("scaling") or {}).get("cpus_per_worker", 1)
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise K8sError(f"scaling.cpus_per_worker must be an integer >= 1, got {cpus!r}")
    storage = Storage.parse(options.storage)
    dataset_path, data, binary = _embedded_dataset(train_config, config_dir, options.dataset_in_pod)
    config_name = f"{options.name}-config"
    plan_json = plan.to_json()
    data = {TRAIN_CONFIG_FILE: _yaml().safe_dump(mounted_config(train_config, plan, options,
                                                                dataset_path), sort_keys=False),
            PLAN_FILE: plan_json, **data}
    size = sum(len(v.encode()) for v in data.values()) + sum(len(v) for v in binary.values())
    if size > CONFIGMAP_LIMIT_BYTES:
        raise K8sError(f"config, plan and dataset are {size} bytes, over the 1 MiB ConfigMap "
                       "limit. To fix: put the dataset on the shared storage and pass "
                       "--dataset-in-pod")
    common_labels = {"app.kubernetes.io/name": "rayquant", "app.kubernetes.io/instance": options.name}
    configmap: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap",
                                 "metadata": {"name": config_name, "namespace": options.namespace,
                                              "labels": dict(common_labels)},
                                 "data": data}
    if binary:
        configmap["binaryData"] = binary

    env: list[dict] = []
    if options.secret_ref:
        secret, key = options.secret_ref
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    volumes = [{"name": "rayquant-config", "configMap": {"name": config_name}}]
    mounts = [{"name": "rayquant-config", "mountPath": CONFIG_MOUNT_DIR, "readOnly": True}]
    if storage.pvc:
        volumes.append({"name": "rayquant-storage",
                        "persistentVolumeClaim": {"claimName": storage.pvc}})
        mounts.append({"name": "rayquant-storage", "mountPath": STORAGE_MOUNT_DIR})

    head = {
        # num-gpus 0: CUDA base images expose every GPU of a node to a container that asks for
        # none; Ray must never place a training worker on the head.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
        "template": _pod_template("head", options, head_pod_size(), env, volumes, mounts, None, ()),
    }
    cluster_spec = {"rayVersion": options.ray_version, "enableInTreeAutoscaling": False,
                    # Ray's token auth (Ray >= 2.52): KubeRay creates the token Secret and hands it
                    # to every pod and to the job submitter.
                    "authOptions": {"mode": "token"},
                    "headGroupSpec": head,
                    "workerGroupSpecs": [_worker_group(n, options, cpus, env, volumes, mounts)
                                         for n in plan.node_plans]}
    metadata = {"name": options.name, "namespace": options.namespace, "labels": dict(common_labels),
                "annotations": {"rayquant.io/plan-sha256": hashlib.sha256(plan_json.encode()).hexdigest(),
                                "rayquant.io/model": plan.model}}
    if options.cluster:
        metadata["annotations"]["rayquant.io/entrypoint"] = entrypoint()
        return [configmap, {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": metadata,
                            "spec": cluster_spec}]
    job_spec: dict[str, Any] = {
        "entrypoint": entrypoint(),
        "submissionMode": options.submission_mode,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": options.ttl_seconds_after_finished,
        "backoffLimit": options.backoff_limit,
        "activeDeadlineSeconds": options.active_deadline_seconds,
    }
    if options.pip:
        job_spec["runtimeEnvYAML"] = _yaml().safe_dump({"pip": list(options.pip)}, sort_keys=False)
    job_spec["rayClusterSpec"] = cluster_spec
    return [configmap, {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": metadata,
                        "spec": job_spec}]


def dump_yaml(docs: list[dict]) -> str:
    """Multi-document YAML; multi-line strings (the mounted config, plan) as literal blocks."""
    yaml = _yaml()

    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # pods share volume lists: write them out, no &anchors
            return True

    def _str(dumper, value):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    from planner.atomic import SIGNATURE

    # The signature lets `rayquant k8s -o` tell its own earlier output from a user's file.
    return (f"# {SIGNATURE} k8s: re-render with `rayquant k8s` rather than editing by hand\n"
            + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100))


def manifest_summary(docs: list[dict]) -> dict[str, Any]:
    """What was rendered, for `--json` and the CLI's table: groups, replicas, GPUs, CPU, memory."""
    kind_doc = docs[-1]
    spec = kind_doc["spec"].get("rayClusterSpec", kind_doc["spec"])
    groups = []
    for g in spec["workerGroupSpecs"]:
        pod = g["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        affinity = pod.get("affinity", {}).get("nodeAffinity", {})
        groups.append({"group": g["groupName"], "replicas": g["replicas"],
                       "node_type": g["labels"][NODE_TYPE_LABEL],
                       "gpus": int(limits.get(GPU_RESOURCE, 0)),
                       "cpu": limits["cpu"], "memory": limits["memory"],
                       "selector": pod.get("nodeSelector")
                       or affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {})})
    return {"kind": kind_doc["kind"], "name": kind_doc["metadata"]["name"],
            "namespace": kind_doc["metadata"]["namespace"], "configmap": docs[0]["metadata"]["name"],
            "entrypoint": kind_doc["spec"].get("entrypoint",
                                               kind_doc["metadata"]["annotations"].get("rayquant.io/entrypoint")),
            "worker_groups": groups}


def summary_text(summary: Mapping[str, Any]) -> str:
    """A few lines for humans: what was rendered and each worker group's shape."""
    lines = [f"{summary['kind']} {summary['namespace']}/{summary['name']} "
             f"(config: ConfigMap {summary['configmap']}), entrypoint: {summary['entrypoint']}"]
    for g in summary["worker_groups"]:
        lines.append(f"  group {g['group']}: {g['replicas']} pod(s) x {g['gpus']} GPU, "
                     f"{g['cpu']} CPU, {g['memory']} memory, Ray label "
                     f"{NODE_TYPE_LABEL}={g['node_type']}")
    return "\n".join(lines)
