"""KubeRay manifests: schema-valid (KubeRay CRDs, Kubernetes Pod/ConfigMap schemas), worker groups,
selectors, resources and secret handling as the plan says; the k8s/ examples stay in sync."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest

from planner.atomic import write_atomically
import yaml
from click.testing import CliRunner

from planner.hardware import GIB
from planner.plan import JobSpec, MemoryBreakdown, NodePlan, TrainingPlan, WorkerAssignment
from rayquant import k8s
from rayquant.cli import main
from rayquant.placement import NODE_TYPE_LABEL, node_type_label_value, worker_label_selectors

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "kuberay"
K8S_VERSION = "1.37"  # newest schema kubernetes-validate ships


# --- schemas ---------------------------------------------------------------------------------
def _strict(schema):
    """The CRD's structural schema with unknown fields refused (the API server silently prunes
    them, which would hide a misspelt field); int-or-string and preserve-unknown stay open."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators():
    if not SHARED.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {SHARED} (shared/ beside the checkout)")
    out = {}
    for kind, file in (("RayJob", "ray.io_rayjobs.yaml"), ("RayCluster", "ray.io_rayclusters.yaml")):
        crd = yaml.safe_load((SHARED / file).read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = jsonschema.Draft202012Validator(_strict(version["schema"]["openAPIV3Schema"]))
    return out


def _cluster_spec(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


_QUALIFIED = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def kuberay_problems(doc) -> list[str]:
    """The checks KubeRay's webhook/controller applies beyond the CRD schema
    (ray-operator/controllers/ray/utils/validation.go)."""
    problems = []
    name = doc["metadata"]["name"]
    limit = 47 if doc["kind"] == "RayJob" else 53
    if len(name) > limit or not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name):
        problems.append(f"name {name}")
    spec = _cluster_spec(doc)
    groups = [("Head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for group_name, g in groups:
        if not g["template"]["spec"]["containers"]:
            problems.append(f"{group_name}: no container")
        if "labels" in g.get("rayStartParams", {}):
            problems.append(f"{group_name}: rayStartParams labels")
        for key, value in g.get("labels", {}).items():
            if not _QUALIFIED.match(key) or not _VALUE.match(value) or len(value) > 63:
                problems.append(f"{group_name}: label {key}={value}")
        if g is not spec["headGroupSpec"] and not spec.get("enableInTreeAutoscaling"):
            if g.get("minReplicas") is None or g.get("maxReplicas") is None:
                problems.append(f"{group_name}: min/maxReplicas unset without autoscaling")
            elif not g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]:
                problems.append(f"{group_name}: replicas outside [min, max]")
    if doc["kind"] == "RayJob":
        js = doc["spec"]
        submitter = js.get("submitterPodTemplate")
        if submitter is not None:
            if js.get("submissionMode") == "SidecarMode":
                problems.append("SidecarMode with submitterPodTemplate")
            if not submitter["spec"].get("containers"):
                problems.append("submitter: no container")
            # The submitter is a batch Job's pod: Kubernetes refuses restartPolicy Always there.
            if submitter["spec"].get("restartPolicy") not in ("Never", "OnFailure"):
                problems.append("submitter restartPolicy")
        if js.get("ttlSecondsAfterFinished", 0) > 0 and not js.get("shutdownAfterJobFinishes"):
            problems.append("ttl without shutdownAfterJobFinishes")
        if js.get("activeDeadlineSeconds") is not None and js["activeDeadlineSeconds"] <= 0:
            problems.append("activeDeadlineSeconds <= 0")
        if js.get("backoffLimit", 0) < 0:
            problems.append("backoffLimit < 0")
        if "runtimeEnvYAML" in js and not isinstance(yaml.safe_load(js["runtimeEnvYAML"]), dict):
            problems.append("runtimeEnvYAML is not a YAML mapping")
    return problems


def assert_valid(docs, crd_validators):
    configmap, ray_doc = docs
    kubernetes_validate.validate(configmap, K8S_VERSION, strict=True)
    errors = sorted(crd_validators[ray_doc["kind"]].iter_errors(ray_doc), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])
    assert kuberay_problems(ray_doc) == []
    spec = _cluster_spec(ray_doc)
    templates = [g["template"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]
    if "submitterPodTemplate" in ray_doc["spec"]:
        templates.append(ray_doc["spec"]["submitterPodTemplate"])
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "p", **template.get("metadata", {})}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


# --- plans by hand (the renderer's contract is the TrainingPlan) --------------------------------
def node_plan(gpu: str, gpus_per_node: int, nodes: int, host_memory_bytes: int = 0,
              quantization: str = "fp8") -> NodePlan:
    return NodePlan(
        node_type=f"{gpu}:{gpus_per_node}", gpu=gpu, nodes=nodes, gpus_per_node=gpus_per_node,
        quantization=quantization, compute_dtype="bfloat16", micro_batch_size=2,
        gradient_accumulation_steps=2, optimizer="adamw_8bit", gradient_checkpointing="unsloth",
        placement="per-gpu", backend="unsloth",
        workers_per_node=1 if gpu == "CPU" else gpus_per_node, gpus_per_worker=1,
        peak_memory_bytes=20 * GIB, memory_budget_bytes=70 * GIB,
        breakdown=MemoryBreakdown(16 * GIB, GIB, GIB, GIB, GIB, GIB, GIB), tokens_per_second=1e3,
        reasons={"quantization": "test"}, host_memory_bytes=host_memory_bytes)


def training_plan(*nodes: NodePlan, model: str = "meta-llama/Llama-3.1-8B") -> TrainingPlan:
    workers = []
    for n in nodes:
        for i in range(n.nodes):
            for local in range(n.workers_per_node):
                workers.append(WorkerAssignment(len(workers), n.node_type, i, local))
    return TrainingPlan(model=model, model_summary={}, job=JobSpec(), node_plans=nodes,
                        workers=workers)


H100 = training_plan(node_plan("H100-80GB", 8, 2, host_memory_bytes=3 * GIB))
MIXED = training_plan(node_plan("H100-80GB", 8, 1), node_plan("A10G", 1, 4, 5 * GIB, "nf4"))
CONFIG = {"model": "meta-llama/Llama-3.1-8B", "dataset": "/data/train.jsonl",
          "sft": {"seq_len": 2048, "global_batch_size": 32}, "run": {"output_dir": "/tmp/out"}}


def options(**kw) -> k8s.K8sOptions:
    base = dict(name="llama-ft", image="ghcr.io/acme/rayquant:0.1.0", storage="rayquant-pvc",
                dataset_in_pod="/mnt/rayquant/data/train.jsonl", hf_token_secret="hf-token")
    return k8s.K8sOptions(**{**base, **kw})


def render(plan=H100, config=CONFIG, **kw):
    return k8s.render_manifests(plan, config, options(**kw))


# --- schema validity -------------------------------------------------------------------------
@pytest.mark.parametrize("plan", [H100, MIXED], ids=["h100", "mixed"])
@pytest.mark.parametrize("cluster", [False, True], ids=["rayjob", "raycluster"])
def test_manifests_validate_against_kuberay_and_kubernetes_schemas(plan, cluster, crd_validators):
    docs = render(plan, cluster=cluster, pip=("rayquant[train]==0.1.0",))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayCluster" if cluster else "RayJob"]
    assert_valid(docs, crd_validators)


def test_strict_crd_schema_catches_a_misspelt_field(crd_validators):
    _, job = render()
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParam"] = {}
    assert list(crd_validators["RayJob"].iter_errors(job))


# --- worker groups, selectors, resources ------------------------------------------------------
def groups(docs):
    return _cluster_spec(docs[1])["workerGroupSpecs"]


def container(group):
    return group["template"]["spec"]["containers"][0]


def test_homogeneous_h100_one_group_sized_from_the_plan():
    docs = render(H100)
    (group,) = groups(docs)
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 2)
    res = container(group)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "8" and res["requests"] == res["limits"]
    pod = group["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    size = k8s.worker_pod_size(H100.node_plans[0])
    assert res["limits"]["memory"] == f"{size.memory_gib}Gi"
    assert size.memory_bytes >= 8 * 3 * GIB + 8 * k8s.WORKER_PROCESS_BYTES
    assert int(res["limits"]["cpu"]) >= 8  # at least one CPU per Ray Train worker


def test_head_has_no_gpus_and_no_gpu_selector():
    spec = _cluster_spec(render(MIXED)[1])
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in container(head)["resources"]["limits"]
    assert "nodeSelector" not in head["template"]["spec"]
    assert "tolerations" not in head["template"]["spec"]


def test_mixed_cluster_one_group_per_node_type_with_its_gpu_selector():
    by_type = {g["labels"][NODE_TYPE_LABEL]: g for g in groups(render(MIXED))}
    assert set(by_type) == {"H100-80GB-8", "A10G-1"}
    h100, a10g = by_type["H100-80GB-8"], by_type["A10G-1"]
    assert h100["replicas"] == 1 and a10g["replicas"] == 4
    assert container(h100)["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container(a10g)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert a10g["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10G"}
    assert h100["groupName"] != a10g["groupName"]


def test_ray_labels_are_what_worker_placement_selects_on():
    """Every selector placement gives a rank is satisfied by the labels of its node type's group."""
    from planner.hardware import parse_gpu_spec

    by_value = {g["labels"][NODE_TYPE_LABEL]: g for g in groups(render(MIXED))}
    node_types = parse_gpu_spec("1x8xH100-80GB,4x1xA10G")
    selectors = worker_label_selectors(MIXED, node_types, node_labels={})
    for worker, selector in zip(MIXED.workers, selectors):
        group = by_value[selector[NODE_TYPE_LABEL]]
        assert group["labels"][NODE_TYPE_LABEL] == node_type_label_value(worker.node_type)
        # The pod carries it too (for kubectl and for KubeRay versions that copy pod labels).
        assert group["template"]["metadata"]["labels"][NODE_TYPE_LABEL] == selector[NODE_TYPE_LABEL]


def test_host_memory_for_offloaded_activations_raises_the_memory_request():
    base = node_plan("A10G", 1, 4)
    more = dataclasses.replace(base, host_memory_bytes=20 * GIB)
    assert (k8s.worker_pod_size(more).memory_bytes - k8s.worker_pod_size(base).memory_bytes
            == 20 * GIB)


def test_cpus_follow_the_configs_cpus_per_worker():
    def cpus(config):
        return [int(container(g)["resources"]["limits"]["cpu"]) for g in groups(render(MIXED, config))]

    more = cpus({**CONFIG, "scaling": {"cpus_per_worker": 4}})
    base = cpus(CONFIG)
    # 8 workers on an H100 node, 1 on an A10G node: 3 more CPUs each.
    assert [m - b for m, b in zip(more, base)] == [8 * 3, 1 * 3]
    assert base[1] <= 4  # a 1-GPU node of 4 vCPUs still fits the default


def test_cloud_gpu_label_gke_selects_every_label_value_of_the_gpu():
    (group,) = groups(render(H100, gpu_label="cloud.google.com/gke-accelerator"))
    spec = group["template"]["spec"]
    assert "nodeSelector" not in spec
    (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": "cloud.google.com/gke-accelerator", "operator": "In",
                                         "values": ["nvidia-h100-80gb", "nvidia-h100-mega-80gb"]}]


def test_gpu_without_a_known_cloud_label_value_says_how_to_fix_and_accepts_an_override():
    with pytest.raises(k8s.K8sError, match="--gpu-value A10G="):
        render(MIXED, gpu_label="cloud.google.com/gke-accelerator")
    docs = render(MIXED, gpu_label="example.com/gpu", gpu_values={"A10G": "a10g", "H100-80GB": "h100"})
    selectors = [g["template"]["spec"]["nodeSelector"] for g in groups(docs)]
    assert selectors == [{"example.com/gpu": "h100"}, {"example.com/gpu": "a10g"}]


def test_cpu_node_type_renders_without_gpus():
    plan = training_plan(node_plan("CPU", 1, 2), model="rayquant/tiny-llama")
    (group,) = groups(render(plan, config={**CONFIG, "model": "rayquant/tiny-llama"}))
    spec = group["template"]["spec"]
    assert "nvidia.com/gpu" not in container(group)["resources"]["limits"]
    assert "nodeSelector" not in spec and "tolerations" not in spec


# --- config, storage, entrypoint ----------------------------------------------------------------
def mounted(docs):
    return yaml.safe_load(docs[0]["data"][k8s.TRAIN_CONFIG_FILE])


def test_config_and_plan_are_mounted_and_the_entrypoint_trains_on_them():
    docs = render(MIXED)
    configmap, job = docs
    assert TrainingPlan.from_json(configmap["data"]["plan.json"]) == MIXED
    config = mounted(docs)
    assert config["plan"] == "/etc/rayquant/plan.json"
    assert config["run"]["storage_path"] == "/mnt/rayquant" and "output_dir" not in config["run"]
    assert config["run"]["name"] == "llama-ft" and config["sft"] == CONFIG["sft"]
    assert job["spec"]["entrypoint"] == "rayquant train /etc/rayquant/train.yaml"
    spec = _cluster_spec(job)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container(group)["volumeMounts"]}
        assert volumes[mounts["/etc/rayquant"]]["configMap"]["name"] == configmap["metadata"]["name"]
        assert volumes[mounts["/mnt/rayquant"]]["persistentVolumeClaim"] == {"claimName": "rayquant-pvc"}


def test_job_lifecycle_fields():
    spec = render(pip=("rayquant[train]==0.1.0",), backoff_limit=3,
                  active_deadline_seconds=7200)[1]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (3, 7200)
    assert spec["submissionMode"] == "K8sJobMode"
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"pip": ["rayquant[train]==0.1.0"]}
    assert "runtimeEnvYAML" not in render()[1]["spec"]


def test_uri_storage_needs_no_volume():
    docs = render(storage="s3://bucket/runs/")
    assert mounted(docs)["run"]["storage_path"] == "s3://bucket/runs"
    head = _cluster_spec(docs[1])["headGroupSpec"]["template"]["spec"]
    assert all("persistentVolumeClaim" not in v for v in head["volumes"])


@pytest.mark.parametrize("storage, match", [("file:///tmp/x", "scheme 'file'"),
                                            ("My_PVC", "neither a URI nor a valid PVC name")])
def test_bad_storage_is_refused_with_a_fix(storage, match):
    with pytest.raises(k8s.K8sError, match=match):
        options(storage=storage)


def test_small_local_dataset_travels_in_the_configmap(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    docs = k8s.render_manifests(H100, {**CONFIG, "dataset": "train.jsonl"},
                                options(dataset_in_pod=None), config_dir=str(tmp_path))
    assert docs[0]["data"]["dataset.jsonl"] == data.read_text()
    assert mounted(docs)["dataset"] == "/etc/rayquant/dataset.jsonl"


def test_large_local_dataset_is_refused_with_a_fix(tmp_path):
    (tmp_path / "big.jsonl").write_bytes(b"x" * (k8s.DATASET_EMBED_LIMIT_BYTES + 1))
    with pytest.raises(k8s.K8sError, match="--dataset-in-pod"):
        k8s.render_manifests(H100, {**CONFIG, "dataset": "big.jsonl"}, options(dataset_in_pod=None),
                             config_dir=str(tmp_path))


def test_model_mismatch_between_config_and_plan_is_refused():
    with pytest.raises(k8s.K8sError, match="differs from the plan"):
        render(config={**CONFIG, "model": "Qwen/Qwen2.5-7B"})


# --- secrets ---------------------------------------------------------------------------------
def test_hf_token_comes_from_a_secret_on_every_pod():
    spec = _cluster_spec(render(MIXED, hf_token_secret="hf-creds:token")[1])
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        env = {e["name"]: e for e in container(group)["env"]}
        assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {
            "secretKeyRef": {"name": "hf-creds", "key": "token"}}}
        assert "value" not in env["HF_TOKEN"]


def test_no_secret_no_token_env():
    spec = _cluster_spec(render(hf_token_secret=None, no_hf_token=True)[1])
    assert "HF_TOKEN" not in {e["name"] for e in container(spec["headGroupSpec"]).get("env", [])}


@pytest.mark.parametrize("config", [
    {**CONFIG, "hf_token": "anything"},
    {**CONFIG, "sft": {"note": "hf_" + "a" * 34}},
], ids=["token-key", "token-value"])
def test_inline_token_in_the_config_is_refused(config):
    with pytest.raises(k8s.K8sError, match="--hf-token-secret"):
        render(config=config)


def test_token_passed_as_secret_name_is_refused():
    with pytest.raises(k8s.K8sError, match="never the token itself"):
        options(hf_token_secret="hf_" + "B" * 34)


@pytest.mark.parametrize("field, value, match", [
    ("name", "Llama_FT", "DNS-1035"), ("name", "a" * 48, "at most 47"),
    ("namespace", "Bad NS", "namespace"), ("image", "", "image"),
    ("submission_mode", "InteractiveMode", "submission mode"),
    ("active_deadline_seconds", 0, "active deadline"),
])
def test_bad_options_are_refused_clearly(field, value, match):
    with pytest.raises(k8s.K8sError, match=match):
        options(**{field: value})


def test_output_yaml_round_trips_and_is_written_atomically(tmp_path):
    docs = render(MIXED)
    out = tmp_path / "sub" / "rayjob.yaml"
    write_atomically(out, k8s.dump_yaml(docs))
    assert list(yaml.safe_load_all(out.read_text())) == docs
    assert [p.name for p in out.parent.iterdir()] == ["rayjob.yaml"]  # no temp file left


# --- the CLI and the rendered examples in k8s/ -------------------------------------------------
def run_cli(*args):
    result = CliRunner().invoke(main, ["k8s", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


EXAMPLE_ARGS = ["--config", "k8s/train.yaml", "--image", "registry.example.com/rayquant:0.1.0",
                "--image-pull-secret", "regcred", "--storage", "rayquant-pvc", "--hf-token-secret", "hf-token",
                "--dataset-in-pod", "/mnt/rayquant/data/train.jsonl"]
EXAMPLES = {
    "rayjob-h100.yaml": ["--gpus", "2x8xH100-80GB", "--name", "llama-h100", *EXAMPLE_ARGS],
    "rayjob-mixed.yaml": ["--gpus", "1x8xH100-80GB,4x1xA10G", "--name", "llama-mixed", *EXAMPLE_ARGS],
}


@pytest.mark.parametrize("filename", sorted(EXAMPLES))
def test_examples_in_k8s_dir_match_the_renderer(filename, tmp_path, monkeypatch, crd_validators):
    """k8s/ holds what `rayquant k8s` renders today (set RAYQUANT_UPDATE_K8S_EXAMPLES=1 to
    re-render them after a planner or renderer change)."""
    monkeypatch.chdir(REPO)
    out = tmp_path / filename
    result = run_cli(*EXAMPLES[filename], "-o", str(out))
    assert result.exit_code == 0, result.output
    rendered = out.read_text()
    committed = REPO / "k8s" / filename
    if os.environ.get("RAYQUANT_UPDATE_K8S_EXAMPLES") == "1":
        write_atomically(committed, rendered)
    assert committed.read_text() == rendered, (
        f"k8s/{filename} is stale: re-render with RAYQUANT_UPDATE_K8S_EXAMPLES=1 "
        f"pytest tests/test_k8s.py -k examples")
    docs = list(yaml.safe_load_all(rendered))
    assert_valid(docs, crd_validators)
    assert "hf_" not in rendered  # the token is only ever a Secret reference


def test_mixed_example_groups_follow_its_plan():
    docs = list(yaml.safe_load_all((REPO / "k8s" / "rayjob-mixed.yaml").read_text()))
    plan = TrainingPlan.from_json(docs[0]["data"]["plan.json"])
    by_label = {g["labels"][NODE_TYPE_LABEL]: g for g in groups(docs)}
    assert set(by_label) == {node_type_label_value(p.node_type) for p in plan.node_plans}
    for p in plan.node_plans:
        group = by_label[node_type_label_value(p.node_type)]
        assert group["replicas"] == p.nodes
        limits = container(group)["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == str(p.gpus_per_node)
        assert limits["memory"] == f"{k8s.worker_pod_size(p).memory_gib}Gi"


def test_cli_prints_yaml_and_a_json_summary(monkeypatch):
    monkeypatch.chdir(REPO)
    result = run_cli(*EXAMPLES["rayjob-mixed.yaml"])
    assert result.exit_code == 0
    docs = list(yaml.safe_load_all(result.output))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    summary = json.loads(run_cli(*EXAMPLES["rayjob-mixed.yaml"], "--json").output)
    assert {(g["node_type"], g["replicas"], g["gpus"]) for g in summary["worker_groups"]} == {
        ("H100-80GB-8", 1, 8), ("A10G-1", 4, 1)}
    assert summary["entrypoint"] == "rayquant train /etc/rayquant/train.yaml"


def test_cli_summary_of_a_cpu_only_cluster(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    result = run_cli("--config", "k8s/train.yaml", "--gpus", "2x1xCPU", "--model",
                     "rayquant/tiny-llama", "--image", "img:1", "--storage", "pvc",
                     "--dataset-in-pod", "/data/x.jsonl", "--json")
    assert result.exit_code != 0 and "differs from the plan" in result.output
    config = tmp_path / "train.yaml"
    config.write_text("model: rayquant/tiny-llama\ndataset: /data/x.jsonl\nsft: {seq_len: 64}\n")
    result = run_cli("--config", str(config), "--gpus", "2x1xCPU", "--image", "img:1",
                     "--storage", "pvc", "--dataset-in-pod", "/data/x.jsonl", "--json")
    (group,) = json.loads(result.output)["worker_groups"]
    assert (group["node_type"], group["replicas"], group["gpus"], group["selector"]) == (
        "CPU-1", 2, 0, {})


def test_cli_uses_a_given_plan_and_renders_a_raycluster(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(MIXED.to_json())
    result = run_cli("--config", "k8s/train.yaml", "--plan", str(plan_file), "--image", "img:1",
                     "--storage", "gs://bucket/runs", "--dataset-in-pod", "/data/x.jsonl",
                     "--hf-token-secret", "hf-token", "--cluster",
                     "--gpu-label", "karpenter.k8s.aws/instance-gpu-name")
    assert result.exit_code == 0, result.output
    configmap, cluster = yaml.safe_load_all(result.output)
    assert cluster["kind"] == "RayCluster"
    assert TrainingPlan.from_json(configmap["data"]["plan.json"]) == MIXED
    selectors = [g["template"]["spec"]["nodeSelector"] for g in groups([configmap, cluster])]
    assert selectors == [{"karpenter.k8s.aws/instance-gpu-name": "h100"},
                         {"karpenter.k8s.aws/instance-gpu-name": "a10g"}]


@pytest.mark.parametrize("args, match", [
    (["--gpus", "2x8xH100-80GB", "--inventory", "nodes.yaml"], "exclude each other"),
    (["--gpus", "2x8xNOPE-GPU"], "unknown GPU"),
    (["--gpus", "1x1xT4", "--gpu-value", "T4"], "GPU=VALUE"),
    (["--gpus", "1x1xT4", "--name", "Bad_Name"], "DNS-1035"),
], ids=["two-clusters", "unknown-gpu", "bad-gpu-value", "bad-name"])
def test_cli_errors_are_clear_and_without_traceback(args, match, monkeypatch):
    monkeypatch.chdir(REPO)
    result = run_cli("--config", "k8s/train.yaml", "--image", "img:1", "--storage", "pvc",
                     "--dataset-in-pod", "/data/x.jsonl", *args)
    assert result.exit_code != 0
    assert match in result.output and "Traceback" not in result.output


def test_cli_refuses_a_missing_config(tmp_path):
    result = run_cli("--config", str(tmp_path / "nope.yaml"), "--gpus", "1x1xT4", "--image", "i",
                     "--storage", "pvc")
    assert result.exit_code == 2 and "cannot read --config" in result.output and "To fix" in result.output


# --- model cache, disk, pod identity, storage credentials, gated models (issue 15) -------------
def pods(doc):
    """(role, pod spec) of every pod the RayJob/RayCluster makes: head, each worker group, and the
    submitter when the manifest carries its template."""
    spec = _cluster_spec(doc)
    out = [("head", spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    if "submitterPodTemplate" in doc["spec"]:
        out.append(("submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
    return out


def env_of(pod_spec):
    return {e["name"]: e for e in pod_spec["containers"][0].get("env", [])}


def ephemeral_gib(group):
    res = container(group)["resources"]
    assert res["requests"].get("ephemeral-storage") == res["limits"].get("ephemeral-storage")
    value = res["limits"].get("ephemeral-storage")
    return None if value is None else int(value.removesuffix("Gi"))


def test_pvc_storage_gets_a_model_cache_on_it_by_default(crd_validators):
    docs = render(MIXED)
    assert_valid(docs, crd_validators)
    for role, pod in pods(docs[1]):
        assert env_of(pod)["HF_HOME"] == {"name": "HF_HOME", "value": "/mnt/rayquant/huggingface"}
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert "/mnt/rayquant" in mounts, role  # HF_HOME is on the mounted claim
    # With the cache the model is not downloaded into the pods' disks: the A10G group (NF4, no FP8
    # copy) asks only for Ray's temp dir.
    a10g = {g["labels"][NODE_TYPE_LABEL]: g for g in groups(docs)}["A10G-1"]
    assert ephemeral_gib(a10g) == k8s.sizing.RAY_TEMP_BYTES // GIB


@pytest.mark.parametrize("given, hf_home", [("hf", "/mnt/rayquant/hf"),
                                            ("/mnt/rayquant/cache/hf", "/mnt/rayquant/cache/hf")])
def test_model_cache_path_on_the_pvc(given, hf_home):
    spec = _cluster_spec(render(MIXED, model_cache=given)[1])
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert env_of(group["template"]["spec"])["HF_HOME"]["value"] == hf_home


@pytest.mark.parametrize("kw, match", [
    (dict(model_cache="/data/hf"), "must be a directory on the PVC"),
    (dict(model_cache="../hf"), "must be a directory on the PVC"),
    (dict(model_cache="hf", storage="s3://bucket/runs"), "the cache must be on a PVC"),
    (dict(model_cache="hf", no_model_cache=True), "exclude each other"),
], ids=["outside-pvc", "dotdot", "bucket", "both"])
def test_bad_model_cache_is_refused_with_a_fix(kw, match):
    with pytest.raises(k8s.K8sError, match=match):
        options(**kw)


@pytest.mark.parametrize("kw", [dict(no_model_cache=True), dict(storage="s3://bucket/runs")],
                         ids=["no-cache", "bucket"])
def test_without_a_cache_each_worker_pod_has_disk_for_the_model(kw, crd_validators):
    from planner.memory.weights import weight_bytes
    from rayquant.planning import model_spec

    docs = render(MIXED, **kw)
    assert_valid(docs, crd_validators)
    assert all("HF_HOME" not in env_of(pod) for _, pod in pods(docs[1]))
    spec = model_spec(MIXED.model)
    # The checkpoint is the 16-bit safetensors the Hub serves: planner.memory's weights term in 16 bits.
    files = weight_bytes(spec, quantization="bf16", double_quant=True, backend="unsloth", protected_bytes=0)
    assert files == 2 * spec.num_params
    by_type = {g["labels"][NODE_TYPE_LABEL]: g for g in groups(docs)}
    assert ephemeral_gib(by_type["A10G-1"]) == -(-(k8s.sizing.RAY_TEMP_BYTES + files) // GIB)
    # The H100 node loads FP8 through Unsloth, which writes one FP8 copy per worker under /tmp.
    h100 = MIXED.node_plans[0]
    fp8 = 8 * k8s.sizing.fp8_artifact_bytes(spec) if h100.fp8_path == "unsloth" else 0
    assert ephemeral_gib(by_type["H100-80GB-8"]) == -(-(k8s.sizing.RAY_TEMP_BYTES + files + fp8) // GIB)
    # The head reads only the config and tokenizer: no disk request from the model.
    assert "ephemeral-storage" not in container(_cluster_spec(docs[1])["headGroupSpec"])["resources"]["limits"]


def test_checkpoint_bytes_follow_the_checkpoints_storage():
    from rayquant.planning import model_spec

    base, nf4 = model_spec("meta-llama/Llama-3.1-8B"), model_spec("unsloth/Llama-3.1-8B-bnb-4bit")
    assert k8s.sizing.checkpoint_bytes(base) == 2 * base.num_params
    # Pre-quantized NF4: the Hub's file is 5.70 GB (unsloth/Meta-Llama-3.1-8B-bnb-4bit).
    assert 5.5e9 < k8s.sizing.checkpoint_bytes(nf4) < 6.0e9
    fp32 = dataclasses.replace(base, torch_dtype="float32")
    assert k8s.sizing.checkpoint_bytes(fp32) == 2 * k8s.sizing.checkpoint_bytes(base)


def test_service_account_and_pull_secrets_on_every_pod_and_the_submitter(crd_validators):
    docs = render(MIXED, service_account="rayquant-sa",
                  image_pull_secrets=("regcred", "mirror-cred"))
    assert_valid(docs, crd_validators)
    roles = [role for role, _ in pods(docs[1])]
    assert roles == ["head", "h100-80gb-8", "a10g-1", "submitter"]
    for role, pod in pods(docs[1]):
        assert pod["serviceAccountName"] == "rayquant-sa", role
        assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror-cred"}], role
    submitter = docs[1]["spec"]["submitterPodTemplate"]["spec"]
    (box,) = submitter["containers"]
    assert box["image"] == "ghcr.io/acme/rayquant:0.1.0" and "command" not in box  # KubeRay fills it
    assert submitter["restartPolicy"] == "Never"


def test_no_identity_no_submitter_template():
    assert "submitterPodTemplate" not in render(MIXED)[1]["spec"]
    assert all("serviceAccountName" not in pod for _, pod in pods(render(MIXED)[1]))


@pytest.mark.parametrize("mode", ["SidecarMode", "HTTPMode"])
def test_submitter_template_only_in_k8s_job_mode(mode, crd_validators):
    docs = render(MIXED, service_account="rayquant-sa", submission_mode=mode)
    assert "submitterPodTemplate" not in docs[1]["spec"]  # KubeRay refuses one in SidecarMode
    assert_valid(docs, crd_validators)
    assert all(pod["serviceAccountName"] == "rayquant-sa" for _, pod in pods(docs[1]))


def test_raycluster_carries_the_identity_on_its_pods(crd_validators):
    docs = render(MIXED, cluster=True, service_account="rayquant-sa", image_pull_secrets=("regcred",))
    assert_valid(docs, crd_validators)
    assert all(pod["imagePullSecrets"] == [{"name": "regcred"}] for _, pod in pods(docs[1]))


def test_s3_credentials_come_from_the_storage_secret(crd_validators):
    docs = render(MIXED, storage="s3://bucket/runs", storage_secret="s3-creds")
    assert_valid(docs, crd_validators)
    for role, pod in pods(docs[1]):
        env = env_of(pod)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": key}}}
        for key in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": key, "optional": True}
        assert all("value" not in e for name, e in env.items() if name.startswith("AWS_"))
    assert mounted(docs)["run"]["storage_path"] == "s3://bucket/runs"


@pytest.mark.parametrize("storage", ["rayquant-pvc", "gs://bucket/runs"])
def test_storage_secret_needs_an_s3_bucket(storage):
    with pytest.raises(k8s.K8sError, match="not an s3:// bucket"):
        options(storage=storage, storage_secret="s3-creds")


@pytest.mark.parametrize("kw, match", [
    (dict(service_account="Bad_SA"), "--service-account"),
    (dict(image_pull_secrets=("regcred", "regcred")), "twice"),
    (dict(image_pull_secrets=("Reg Cred",)), "--image-pull-secret"),
    (dict(storage="s3://b/r", storage_secret="s3_creds"), "--storage-secret"),
    (dict(no_hf_token=True), "exclude each other"),  # with the base's --hf-token-secret
])
def test_bad_identity_and_secret_names_are_refused(kw, match):
    with pytest.raises(k8s.K8sError, match=match):
        options(**kw)


def test_gated_model_without_a_token_secret_is_refused_unless_said():
    with pytest.raises(k8s.K8sError, match="gated") as e:
        render(MIXED, hf_token_secret=None)
    assert "To fix" in str(e.value) and "--hf-token-secret" in str(e.value) and "--no-hf-token" in str(e.value)
    docs = render(MIXED, hf_token_secret=None, no_hf_token=True)
    assert all("HF_TOKEN" not in env_of(pod) for _, pod in pods(docs[1]))


def test_models_outside_gated_orgs_need_no_token():
    plan = dataclasses.replace(MIXED, model="Qwen/Qwen2.5-7B")
    docs = k8s.render_manifests(plan, {**CONFIG, "model": "Qwen/Qwen2.5-7B"},
                                options(hf_token_secret=None))
    assert all("HF_TOKEN" not in env_of(pod) for _, pod in pods(docs[1]))


def test_cli_gated_model_exit_2_with_the_fix(monkeypatch):
    monkeypatch.chdir(REPO)
    args = [a for a in EXAMPLES["rayjob-mixed.yaml"]]
    i = args.index("--hf-token-secret")
    del args[i:i + 2]
    result = run_cli(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "gated" in result.output and "To fix" in result.output and "--no-hf-token" in result.output
    assert run_cli(*args, "--no-hf-token").exit_code == 0


def test_cli_without_image_says_how_to_build_and_push_it(monkeypatch):
    monkeypatch.chdir(REPO)
    args = [a for a in EXAMPLES["rayjob-mixed.yaml"]]
    i = args.index("--image")
    del args[i:i + 2]
    result = run_cli(*args)
    assert result.exit_code == 2
    assert "docker build -f docker/Dockerfile" in result.stderr and "docker push" in result.stderr
    assert "To fix: pass --image" in result.stderr
    assert (REPO / "docker" / "Dockerfile").is_file()  # the file the instructions name


def test_done_means_private_registry_bucket_and_gated_model_need_no_hand_edit(tmp_path, monkeypatch,
                                                                              crd_validators):
    """Issue 15: a RayJob rendered with the new options is complete for a private registry, an S3
    bucket and a gated model: every pod pulls with the secret, runs as the service account, has
    the S3 credentials and the token, and the workers have disk for the model."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "rayjob.yaml"
    result = run_cli("--config", "k8s/train.yaml", "--gpus", "1x8xH100-80GB,4x1xA10G", "--name", "llama",
                     "--image", "registry.internal/ml/rayquant:0.1.0", "--image-pull-secret", "regcred",
                     "--service-account", "rayquant", "--storage", "s3://bucket/runs",
                     "--storage-secret", "s3-creds", "--hf-token-secret", "hf-token",
                     "--dataset-in-pod", "/data/train.jsonl", "-o", str(out))
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(out.read_text()))
    assert_valid(docs, crd_validators)
    for role, pod in pods(docs[1]):
        assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["serviceAccountName"] == "rayquant"
        assert pod["containers"][0]["image"] == "registry.internal/ml/rayquant:0.1.0"
        if role != "submitter":  # the submitter only talks to the dashboard
            assert {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env_of(pod))
    for group in groups(docs):
        assert ephemeral_gib(group) > 16  # the 16 GB checkpoint is downloaded into each pod
    assert "wrote" in result.output and "disk" in result.output


def test_gated_is_known_without_the_hub_for_gated_orgs_and_unknown_offline(monkeypatch):
    from huggingface_hub import constants

    from rayquant.models import hub_gated

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_gated("meta-llama/Llama-Guard-4-12B") is True  # not in the catalog: its org is gated
    assert hub_gated("google/gemma-3-270m") is True
    assert hub_gated("Qwen/Qwen3-8B") is False  # a catalog model outside the gated orgs
    assert hub_gated("rayquant/tiny-llama") is False and hub_gated("/models/llama") is False
    assert hub_gated("some-org/some-model") is None  # would ask the Hub; offline, unknown
    # Unknown is not refused (the pods say so if the Hub turns them away); a gated org is.
    from rayquant.k8s.render import check_hf_token

    check_hf_token("some-org/some-model", options(hf_token_secret=None))
    with pytest.raises(k8s.K8sError, match="gated"):
        check_hf_token("meta-llama/Llama-Guard-4-12B", options(hf_token_secret=None))
