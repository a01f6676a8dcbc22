"""The manifests: a ConfigMap (training config, plan JSON, a small dataset) and a `ray.io/v1` RayJob
or RayCluster with a head group and one worker group per node type; their YAML and a summary."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shlex
from typing import Any, Mapping

from planner.hardware import lookup_gpu
from planner.plan import NodePlan, PlanError, TrainingPlan
from rayquant.k8s.errors import K8sError
from rayquant.k8s.labels import NODE_TYPE_LABEL, gpu_label_values, group_name, node_type_label_value
from rayquant.k8s.options import (HF_TOKEN_PATTERN, K8sOptions, STORAGE_MOUNT_DIR, STORAGE_SECRET_KEYS,
                                  STORAGE_SECRET_OPTIONAL_KEYS, Storage)
from rayquant.k8s.sizing import (PodSize, head_pod_size, needs_model_spec, worker_ephemeral_terms,
                                 worker_pod_size)
from rayquant.placement import CPU_DEVICE

CONFIG_MOUNT_DIR = "/etc/rayquant"
TRAIN_CONFIG_FILE = "train.yaml"
PLAN_FILE = "plan.json"
GPU_RESOURCE = "nvidia.com/gpu"
EPHEMERAL_RESOURCE = "ephemeral-storage"
# KubeRay's default submitter container (ray-operator/controllers/ray/common/job.go
# GetDefaultSubmitterContainer): rendered with its resources when the submitter pod needs a service
# account or pull secrets, which the default template does not carry.
SUBMITTER_CONTAINER = "ray-job-submitter"
SUBMITTER_RESOURCES = {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
CONFIGMAP_LIMIT_BYTES = 1024 * 1024  # Kubernetes rejects ConfigMaps over 1 MiB of data
# A local dataset up to this size travels in the ConfigMap (leaving room for config and plan);
# larger ones must be on the shared storage or in the image.
DATASET_EMBED_LIMIT_BYTES = 512 * 1024
_TOKEN_KEYS = {"token", "hf_token", "hub_token", "huggingface_token", "hf_hub_token", "use_auth_token"}


def check_no_inline_token(config: Any, where: str = "config") -> None:
    """Refuse a training config that carries a Hugging Face token: ConfigMaps are not secret."""
    if isinstance(config, Mapping):
        for key, value in config.items():
            if (str(key).lower() in _TOKEN_KEYS and isinstance(value, str) and value.strip()) or \
                    (isinstance(value, str) and HF_TOKEN_PATTERN.match(value.strip())):
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
    return _shipped_data(given, "dataset", config_dir)


def _shipped_data(given: str, key: str, config_dir: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """(the `key` data as the pods name it, ConfigMap data, binaryData): a Hub dataset id travels
    as it is (the pods load it from the Hub, with HF_TOKEN from --hf-token-secret); a small local
    file travels in the ConfigMap under `key`."""
    from rayquant.config import resolve_reference

    path = resolve_reference(given, config_dir)
    if path == given and not given.startswith(("/", ".", "~")) and not os.path.exists(path):
        return given, {}, {}  # a Hub dataset id (rayquant.models.looks_like_hub_id)
    in_pod = ("pass --dataset-in-pod /path/in/the/pods" if key == "dataset"
              else f"point `{key}:` at its path in the pods")
    if os.path.isdir(path):
        raise K8sError(f"{key} {path} is a directory, which cannot travel in a ConfigMap. To fix: copy it "
                       f"to the shared storage (e.g. {STORAGE_MOUNT_DIR}/data/) and point `{key}:` there"
                       + (" (or pass --dataset-in-pod)" if key == "dataset" else ""))
    if not os.path.isfile(path):
        raise K8sError(f"{key} {path} does not exist here, so it cannot be shipped to the pods. "
                       f"To fix: fix `{key}:` in the config, or, if the file is already on the "
                       f"shared storage or in the image, {in_pod}")
    size = os.path.getsize(path)
    if size > DATASET_EMBED_LIMIT_BYTES:
        raise K8sError(f"{key} {path} is {size / 2**20:.1f} MiB, too big for a ConfigMap (at most "
                       f"{DATASET_EMBED_LIMIT_BYTES // 1024} KiB travel with the manifest). To fix: "
                       f"copy it to the shared storage (e.g. {STORAGE_MOUNT_DIR}/data/) or into the "
                       f"image and {in_pod}")
    ext = os.path.splitext(path)[1].lower()
    key = key + (ext if re.match(r"^\.[a-z0-9]+$", ext) else "")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return f"{CONFIG_MOUNT_DIR}/{key}", {key: raw.decode("utf-8")}, {}
    except UnicodeDecodeError:
        return f"{CONFIG_MOUNT_DIR}/{key}", {}, {key: base64.b64encode(raw).decode("ascii")}


def mounted_config(train_config: Mapping[str, Any], plan: TrainingPlan, options: K8sOptions,
                   dataset_path: str, eval_dataset_path: str | None = None) -> dict[str, Any]:
    """The `rayquant train` config as the pods see it (schema: rayquant/config.py).

    The plan is the mounted plan JSON (made with the config's `calibration:`, which the pods do not
    need), results go to the shared storage, the Ray address is the one KubeRay gives the entrypoint
    (RAY_ADDRESS), and the run is named after the job.
    """
    config = dict(train_config)
    config.pop("calibration", None)
    given = config.get("model")
    if given not in (None, plan.model):
        raise K8sError(f"the config's model {given!r} differs from the plan's {plan.model!r}. To "
                       "fix: drop --model or make it match the config's `model`")
    config["model"] = plan.model
    config["dataset"] = dataset_path
    if eval_dataset_path is not None:
        config["eval_dataset"] = eval_dataset_path
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


def _yaml():
    import yaml

    return yaml


def _container(role: str, image: str, size: PodSize, env: list[dict], mounts: list[dict]) -> dict:
    resources: dict[str, Any] = {"cpu": str(size.cpus), "memory": f"{size.memory_gib}Gi"}
    if size.ephemeral_bytes:
        resources[EPHEMERAL_RESOURCE] = f"{size.ephemeral_gib}Gi"
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
                            "volumes": volumes, **_pod_identity(options)}
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


def _pod_identity(options: K8sOptions) -> dict[str, Any]:
    """serviceAccountName and imagePullSecrets of every pod, the submitter's included."""
    out: dict[str, Any] = {}
    if options.service_account:
        out["serviceAccountName"] = options.service_account
    if options.image_pull_secrets:
        out["imagePullSecrets"] = [{"name": n} for n in options.image_pull_secrets]
    return out


def _env(options: K8sOptions) -> list[dict]:
    """The env of the head and worker containers: the Hugging Face token and S3 credentials from
    their Secrets (only references in the manifest), HF_HOME on the model cache."""
    env: list[dict] = []
    if options.secret_ref:
        secret, key = options.secret_ref
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    if options.hf_home:
        env.append({"name": "HF_HOME", "value": options.hf_home})
    if options.storage_secret:
        for key in STORAGE_SECRET_KEYS + STORAGE_SECRET_OPTIONAL_KEYS:
            ref: dict[str, Any] = {"name": options.storage_secret, "key": key}
            if key in STORAGE_SECRET_OPTIONAL_KEYS:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def _submitter_template(options: K8sOptions) -> dict | None:
    """The K8sJobMode submitter pod, when it needs the service account or pull secrets (KubeRay's
    default copies only the head's imagePullSecrets); KubeRay fills in its command and env."""
    identity = _pod_identity(options)
    if options.submission_mode != "K8sJobMode" or not identity:
        return None  # SidecarMode runs in the head pod (KubeRay refuses a template there); HTTPMode has none
    labels = {"app.kubernetes.io/name": "rayquant", "app.kubernetes.io/instance": options.name,
              "app.kubernetes.io/component": "submitter"}
    container = {"name": SUBMITTER_CONTAINER, "image": options.image, "imagePullPolicy": "IfNotPresent",
                 "resources": {k: dict(v) for k, v in SUBMITTER_RESOURCES.items()}}
    # restartPolicy Never: a Job's pods must not be Always; retries are the RayJob's backoffLimit.
    return {"metadata": {"labels": labels},
            "spec": {"restartPolicy": "Never", **identity, "containers": [container]}}


def check_hf_token(model: str, options: K8sOptions) -> None:
    """Refuse a gated Hub model without a token Secret, unless --no-hf-token says so."""
    if options.secret_ref or options.no_hf_token:
        return
    from rayquant.models import hub_gated

    if hub_gated(model):
        raise K8sError(f"{model} is gated on the Hub: the pods can download it only with the token "
                       "of an account that accepted its terms, and no --hf-token-secret is given. "
                       "To fix: create the Secret (kubectl create secret generic hf-token "
                       "--from-literal=HF_TOKEN=hf_...) and pass --hf-token-secret hf-token, or pass "
                       "--no-hf-token if the pods get the model another way (a model cache already "
                       "holding it, HF_TOKEN set by your cluster)")


def _model_spec(model: str):
    from planner.model import UnknownModelError
    from rayquant.planning import model_spec

    try:
        return model_spec(model)
    except UnknownModelError as e:
        raise K8sError(f"cannot size the pods' disk for {model}: {e}") from None


def _worker_group(node: NodePlan, options: K8sOptions, cpus_per_worker: int, env: list[dict],
                  volumes: list[dict], mounts: list[dict], ephemeral_terms: Mapping[str, int]) -> dict:
    if node.gpu == CPU_DEVICE:
        values: tuple[str, ...] = ()
    else:
        try:
            gpu = lookup_gpu(node.gpu)
        except PlanError as e:
            raise K8sError(f"node type {node.node_type}: {e}") from None
        values = gpu_label_values(gpu, options.gpu_label, options.gpu_values)
    return {
        "groupName": group_name(node.node_type),
        "replicas": node.nodes, "minReplicas": node.nodes, "maxReplicas": node.nodes,
        # KubeRay sets these as Ray node labels (and pod labels); it rejects
        # rayStartParams['labels'] in favour of this field (utils/validation.go).
        "labels": {NODE_TYPE_LABEL: node_type_label_value(node.node_type)},
        "rayStartParams": {},
        "template": _pod_template("worker", options,
                                  worker_pod_size(node, cpus_per_worker, ephemeral_terms), env,
                                  volumes, mounts, node, values),
    }


def render_manifests(plan: TrainingPlan, train_config: Mapping[str, Any], options: K8sOptions,
                     config_dir: str = ".", model=None) -> list[dict]:
    """[ConfigMap, RayJob | RayCluster] running `plan` with the `rayquant train` config given.

    `config_dir` is where the config file lives (its relative dataset path resolves against it).
    `model` is the planner's ModelSpec of plan.model (loaded when None and the worker pods' disk
    is sized from it: no model cache, or FP8 through Unsloth).
    """
    if not plan.node_plans:
        raise K8sError("the plan has no node types; nothing to run")
    check_no_inline_token(train_config)
    check_hf_token(plan.model, options)
    cached = options.hf_home is not None
    if model is None and needs_model_spec(plan.node_plans, cached):
        model = _model_spec(plan.model)
    cpus = (train_config.get("scaling") or {}).get("cpus_per_worker", 1)
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise K8sError(f"scaling.cpus_per_worker must be an integer >= 1, got {cpus!r}")
    storage = Storage.parse(options.storage)
    dataset_path, data, binary = _embedded_dataset(train_config, config_dir, options.dataset_in_pod)
    eval_path = None
    if isinstance(train_config.get("eval_dataset"), str) and train_config["eval_dataset"]:
        eval_path, eval_data, eval_binary = _shipped_data(train_config["eval_dataset"], "eval_dataset", config_dir)
        data, binary = {**data, **eval_data}, {**binary, **eval_binary}
    config_name = f"{options.name}-config"
    plan_json = plan.to_json()
    data = {TRAIN_CONFIG_FILE: _yaml().safe_dump(mounted_config(train_config, plan, options,
                                                                dataset_path, eval_path), sort_keys=False),
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

    env = _env(options)
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
                    "workerGroupSpecs": [_worker_group(n, options, cpus, env, volumes, mounts,
                                                       worker_ephemeral_terms(n, model, cached))
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
    submitter = _submitter_template(options)
    if submitter is not None:
        job_spec["submitterPodTemplate"] = submitter
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
                       "ephemeral_storage": limits.get(EPHEMERAL_RESOURCE),
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
                     f"{g['cpu']} CPU, {g['memory']} memory"
                     + (f", {g['ephemeral_storage']} disk" if g.get("ephemeral_storage") else "")
                     + ", Ray label "
                     f"{NODE_TYPE_LABEL}={g['node_type']}")
    return "\n".join(lines)
