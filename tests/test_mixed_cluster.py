"""A mixed cluster end to end on CPU: two node types on a simulated multi-node Ray cluster.

`ray.cluster_utils.Cluster` starts a head with no CPUs for workers and two worker nodes of different
types: node A (`CPU:1`, carrying the `rayquant.io/node-type` label KubeRay pods get) and node B
(`CPU:2`, no label, so it is pinned by node id). The plan gives the ranks different micro-batches and
accumulation (rank 0 on A: 2 x 1; rank 1 on B: 1 x 3), the heterogeneous DDP scheme: shards in
proportion 2 : 3, the same number of optimizer steps, a token-weighted loss. A single-worker reference
run over the same global batches (1 x 5) must give the same adapter within a stated tolerance.
A third run gives the two node types different quantization as well: row-wise FP8 on node A,
dynamic 4-bit (NF4 with a few modules kept 16-bit) on node B, all-reducing one LoRA adapter.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from planner.plan import JobSpec, MemoryBreakdown, NodePlan, PlanError, TrainingPlan, WorkerAssignment

DATA = "examples/data/tiny_alpaca.jsonl"
MAX_STEPS = 6
# How far the DDP adapter may be from the reference, relative to how far training moved it (the
# norm of LoRA B, which starts at zero). The two runs see the same rows per step but pad them into
# different micro-batches (2 + 3 vs 1 x 5) and sum bf16 products in another order, which 8-bit AdamW
# then rounds into its states; measured 1.0% here (fp32 adapters), so 5% leaves room for other CPUs
# and thread counts.
TOLERANCE = 0.05


def node_plan(node_type: str, micro: int, accum: int, gpus_per_node: int) -> NodePlan:
    return NodePlan(
        node_type=node_type, gpu="CPU", nodes=1, gpus_per_node=gpus_per_node, quantization="nf4",
        compute_dtype="bfloat16", micro_batch_size=micro, gradient_accumulation_steps=accum,
        optimizer="adamw_8bit", gradient_checkpointing="unsloth", placement="per-gpu", backend="unsloth",
        workers_per_node=1, gpus_per_worker=1, peak_memory_bytes=2**30, memory_budget_bytes=4 * 2**30,
        breakdown=MemoryBreakdown(1, 1, 1, 1, 1, 1, 1), tokens_per_second=500.0,
        reasons={"test": "hand-built mixed-cluster plan"})


JOB = JobSpec(seq_len=128, global_batch_size=5, lora_rank=8, lora_alpha=16, quantization="nf4",
              optimizer="adamw_8bit")
MIXED = TrainingPlan(
    model="rayquant/tiny-llama", model_summary={"name": "tiny-llama"}, job=JOB,
    node_plans=(node_plan("CPU:1", 2, 1, 1), node_plan("CPU:2", 1, 3, 2)),
    workers=(WorkerAssignment(0, "CPU:1", 0, 0), WorkerAssignment(1, "CPU:2", 0, 0)))
REFERENCE = dataclasses.replace(MIXED, node_plans=(node_plan("CPU:1", 1, 5, 1),),
                                workers=(WorkerAssignment(0, "CPU:1", 0, 0),))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("mixed")
    saved = os.environ.get("RAYQUANT_CACHE")
    os.environ["RAYQUANT_CACHE"] = str(root / "cache")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    a = c.add_node(num_cpus=1, labels={"rayquant.io/node-type": "CPU-1"})
    b = c.add_node(num_cpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield {"cluster": c, "address": c.address, "a": a, "b": b, "root": root}
    ray.shutdown()
    c.shutdown()
    if saved is None:
        os.environ.pop("RAYQUANT_CACHE", None)
    else:
        os.environ["RAYQUANT_CACHE"] = saved


def _fit(cluster, plan: TrainingPlan, name: str):
    from rayquant.trainer import RayQuantTrainer

    trainer = RayQuantTrainer(
        model="rayquant/tiny-llama", dataset=DATA, plan=plan, address=cluster["address"],
        sft={"max_steps": MAX_STEPS, "learning_rate": 5e-3, "logging_steps": 1, "seed": 0},
        run={"name": name, "storage_path": str(cluster["root"] / "runs"), "checkpoint_every_steps": 100,
             "max_failures": 0})
    return trainer.fit()


@pytest.fixture(scope="module")
def mixed(cluster):
    return _fit(cluster, MIXED, "mixed")


@pytest.fixture(scope="module")
def reference(cluster):
    return _fit(cluster, REFERENCE, "reference")


@pytest.mark.ray
def test_inventory_sees_two_node_types_and_the_plan_fits(cluster):
    from rayquant.inventory import discover_node_types
    from rayquant.placement import check_cluster_can_host

    types = {nt.key: nt for nt in discover_node_types(cluster["address"])}
    assert set(types) == {"CPU:1", "CPU:2"}  # the head offers no CPU to workers
    assert types["CPU:1"].node_ids == (cluster["a"].node_id,)
    assert types["CPU:2"].node_ids == (cluster["b"].node_id,)
    check_cluster_can_host(MIXED, tuple(types.values()))


@pytest.mark.ray
def test_each_rank_used_its_node_types_settings_for_equal_steps(mixed):
    workers = mixed.manifest["workers"]
    assert [w["node_type"] for w in workers] == ["CPU:1", "CPU:2"]
    assert [(w["micro_batch_size"], w["gradient_accumulation_steps"]) for w in workers] == [(2, 1), (1, 3)]
    assert [w["steps"] for w in workers] == [MAX_STEPS, MAX_STEPS]
    rows = [w["shard_rows"] for w in workers]
    assert rows[0] * 3 == rows[1] * 2  # shards in proportion to micro x accumulation
    assert all(w["quantization"]["used"] == "nf4" for w in workers)
    assert len({w["adapter_sha256"] for w in workers}) == 1


@pytest.mark.ray
def test_each_rank_ran_on_the_node_its_plan_says(cluster, mixed):
    landed = [w.get("node_id") for w in mixed.manifest["workers"]]
    assert landed == [cluster["a"].node_id, cluster["b"].node_id]


@pytest.mark.ray
def test_ranks_landed_on_the_planned_nodes_per_ray_state(cluster, mixed):
    """Independent of what the worker reports: Ray's own record of where the training workers ran."""
    # GCS's actor table (ray.util.state would need the dashboard, which this test cluster lacks).
    from ray._private.state import actors

    nodes = [a["Address"]["NodeID"] for a in actors().values() if a["ActorClassName"] == "RayTrainWorker"]
    # The mixed run started one worker group of two (no failures allowed), pinned one per node; the
    # reference run (if it ran first) adds one more worker on node A, never one on node B.
    assert nodes.count(cluster["b"].node_id) == 1
    assert nodes.count(cluster["a"].node_id) >= 1
    assert set(nodes) <= {cluster["a"].node_id, cluster["b"].node_id}


@pytest.mark.ray
def test_unequal_micro_batches_give_the_single_worker_adapter(mixed, reference):
    import torch
    from safetensors.torch import load_file

    got = load_file(str(mixed.adapter_dir / "adapter_model.safetensors"))
    want = load_file(str(reference.adapter_dir / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    # LoRA B starts at zero, so its norm is how far training moved the adapter.
    b_names = [k for k in want if "lora_B" in k]
    moved = torch.sqrt(sum((want[k].float() ** 2).sum() for k in b_names))
    diff = torch.sqrt(sum(((got[k].float() - want[k].float()) ** 2).sum() for k in b_names))
    assert moved > 0
    assert diff / moved < TOLERANCE, f"relative difference {float(diff / moved):.4f}"
    a_names = [k for k in want if "lora_A" in k]
    a_diff = max(float((got[k].float() - want[k].float()).abs().max()) for k in a_names)
    assert a_diff < 5e-3 * MAX_STEPS  # a few lr-sized Adam steps apart at most
    ref_loss, got_loss = reference.manifest["loss"], mixed.manifest["loss"]
    assert abs(ref_loss["last_fifth_mean"] - got_loss["last_fifth_mean"]) < 0.05 * ref_loss["last_fifth_mean"]


# -- heterogeneous quantization: an FP8 base and a dynamic 4-bit base all-reduce one adapter ----
# (after the Ray-state test above, which counts the mixed run's workers per node, and before the
# node-loss test below, which removes node B)
PROTECTED = 3  # modules rank 1 keeps 16-bit: the budget below buys exactly the first three


@pytest.fixture(scope="module")
def protection(cluster):
    """The dynamic 4-bit budget and the protection it buys, computed by rayquant.dynamic4bit on the
    very checkpoint the workers load (the tiny model built into this cluster's cache)."""
    from rayquant.dynamic4bit import measure_errors_from_checkpoint, protect_cost_bytes, select_protected
    from rayquant.trainer import resolve_model

    model_dir = resolve_model("rayquant/tiny-llama")
    errors = measure_errors_from_checkpoint(model_dir, device="cpu")
    numel = {e.name: e.numel for e in errors}
    order = select_protected(errors, 2**40).protected  # every module, in the order they are protected
    budget = sum(protect_cost_bytes(numel[n]) for n in order[:PROTECTED])
    return {"dir": model_dir, "errors": errors, "budget": budget,
            "expected": select_protected(errors, budget)}


@pytest.fixture(scope="module")
def hetero(cluster, protection):
    """Rank 0 on node A with a row-wise FP8 base, rank 1 on node B with dynamic 4-bit, one DDP job."""
    fp8_plan, d4_plan = MIXED.node_plans
    plan = dataclasses.replace(
        MIXED, job=dataclasses.replace(JOB, quantization=None),
        node_plans=(dataclasses.replace(fp8_plan, quantization="fp8", fp8_path="rowwise"),
                    dataclasses.replace(d4_plan, quantization="dynamic-4bit",
                                        protected_budget_bytes=protection["budget"])))
    return _fit(cluster, plan, "hetero-quant")


@pytest.mark.ray
def test_fp8_and_dynamic_4bit_ranks_train_one_adapter(hetero, protection):
    from safetensors import safe_open

    fp8_rank, d4_rank = hetero.manifest["workers"]
    assert [w["quantization"]["used"] for w in (fp8_rank, d4_rank)] == ["fp8", "dynamic-4bit"]
    assert [w["steps"] for w in (fp8_rank, d4_rank)] == [MAX_STEPS, MAX_STEPS]

    # Rank 0: every decoder projection row-wise FP8 (1 byte per weight + one fp32 scale per row),
    # still FP8 when training ended; no NF4 anywhere.
    errors = protection["errors"]
    with safe_open(str(protection["dir"]) + "/model.safetensors", framework="pt") as f:
        rows = sum(f.get_slice(f"{e.name}.weight").get_shape()[0] for e in errors)
    q0 = fp8_rank["quantization"]
    assert q0["fp8_path"] == "rowwise" and q0["fp8_modules"] == len(errors)
    assert q0["fp8_weight_bytes"] == sum(e.numel for e in errors) + 4 * rows
    assert q0["modules_after_training"] == {"linear4bit": 0, "fp8_rowwise": len(errors)}
    assert "protected_modules" not in q0

    # Rank 1: NF4 except the protected modules, which the worker chose itself from its own error
    # measurements, within the plan's budget.
    q1 = d4_rank["quantization"]
    want = protection["expected"]
    assert q1["protected_modules"] == list(want.protected) and len(want.protected) == PROTECTED
    assert q1["protected_cost_bytes"] == want.cost_bytes <= q1["protected_budget_bytes"] == protection["budget"]
    assert set(q1["protected_reasons"]) == set(want.protected)
    assert q1["protected_weight_bytes"] == 2 * sum(e.numel for e in errors if e.name in want.protected)
    assert q1["linear4bit_modules"] == len(errors) - PROTECTED
    assert q1["modules_after_training"] == {"linear4bit": len(errors) - PROTECTED, "fp8_rowwise": 0}
    assert "fp8_modules" not in q1

    # DDP synchronized only the LoRA parameters, whose shapes do not depend on the base: both ranks
    # end with the same adapter, and training lowered the (all-reduced, token-weighted) loss.
    # (TRL would keep an NF4 base's adapters in bf16 and a 16-bit base's in fp32: one dtype on both.)
    assert [w["adapter_dtype"] for w in (fp8_rank, d4_rank)] == ["float32", "float32"]
    assert fp8_rank["adapter_sha256"] == d4_rank["adapter_sha256"] == hetero.manifest["adapter_sha256"]
    loss = hetero.manifest["loss"]
    assert loss["points"] == MAX_STEPS and loss["last"] < loss["first"], loss


@pytest.mark.ray
def test_the_mixed_quantization_adapter_loads_with_peft(hetero, protection):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(str(hetero.adapter_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())  # B starts at zero
    base = AutoModelForCausalLM.from_pretrained(str(protection["dir"]), dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(hetero.adapter_dir))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)
    for name, tensor in saved.items():
        key = name.replace(".weight", ".default.weight")
        assert torch.equal(loaded[key].to(tensor.dtype), tensor), name
    ids = torch.randint(0, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.ray
def test_a_node_gone_since_planning_refuses_to_start(cluster, mixed, reference):
    from rayquant.placement import PlacementError

    cluster["cluster"].remove_node(cluster["b"])
    with pytest.raises(PlacementError) as err:
        _fit(cluster, MIXED, "after-node-loss")
    msg = str(err.value)
    assert "plan needs 1 node of CPU:2, cluster has 0" in msg
    assert "re-plan with `rayquant plan` or add nodes" in msg
    assert isinstance(err.value, PlanError)


# -- node-spanning: the planner's layer map in a real load -------------------------------------
def _spanning_map(model_dir, gpus: int = 2):
    """The planner's layer map for the tiny model over `gpus` equal budgets too small for one GPU."""
    from planner.hardware import lookup_gpu
    from planner.layermap import bytes_per_gpu, layer_device_map
    from planner.memory import estimate_memory
    from planner.model import load_model_spec

    spec = load_model_spec(str(model_dir))
    est = estimate_memory(spec, lookup_gpu("24GiB"), quantization="nf4", backend="hf", seq_len=64,
                          lora_rank=8, gradient_checkpointing="hf", optimizer="adamw_torch")
    modules = sum(est.module_bytes.values())
    budget = int(modules * 0.75)  # no single GPU holds every module; two do
    device_map = layer_device_map(spec, est.module_bytes, [budget] * gpus)
    return spec, est, device_map, bytes_per_gpu(device_map, est.module_bytes, gpus), budget


def _local_devices() -> list:
    """The devices this machine has: its GPUs, else the CPU (a map index names one of them)."""
    import torch

    return list(range(torch.cuda.device_count())) or ["cpu"]


def test_layer_map_splits_the_model_embeddings_first_head_last(tiny_llama_dir):
    spec, _, device_map, per_gpu, budget = _spanning_map(tiny_llama_dir)
    assert device_map["model.embed_tokens"] == 0 and device_map["lm_head"] == 1
    layers = [device_map[f"model.layers.{i}"] for i in range(spec.num_layers)]
    assert layers == sorted(layers) and set(layers) <= {0, 1}  # contiguous runs
    assert all(b <= budget for b in per_gpu) and all(b > 0 for b in per_gpu)


def test_layer_map_is_what_a_real_load_places(tiny_llama_dir):
    """Load the tiny model in 4-bit through the hf backend's loader with the planner's dict map (indices
    turned into this machine's devices) and check every module sits where the map says."""
    import dataclasses

    from rayquant.loading import load_for_training

    _, _, device_map, _, _ = _spanning_map(tiny_llama_dir)
    devices = _local_devices()
    placed = {module: devices[g % len(devices)] for module, g in device_map.items()}
    plan = dataclasses.replace(MIXED.node_plans[0], placement="node-spanning", backend="hf",
                               gradient_checkpointing="hf", optimizer="adamw_torch", gpus_per_worker=2,
                               gpus_per_node=2, device_map=device_map)
    model, _, info = load_for_training(str(tiny_llama_dir), plan, dataclasses.replace(JOB, backend="hf"),
                                       device_map=placed)
    base = model.get_base_model()
    for module, device in placed.items():
        tensors = list(base.get_submodule(module).parameters()) + list(base.get_submodule(module).buffers())
        want = "cpu" if device == "cpu" else f"cuda:{device}"
        assert tensors and all(str(t.device) == want for t in tensors), module
    assert type(base.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen_dir"])
def test_layer_map_covers_every_tensor_of_the_real_architecture(fixture, request):
    """transformers 5 does not refuse a dict map that leaves a module out (it loads that module
    wherever its default puts it), so the planner's map itself must name a home for every tensor."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = request.getfixturevalue(fixture)
    _, _, device_map, _, _ = _spanning_map(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]

    def home(name: str):
        parts = name.split(".")
        return next((".".join(parts[:k]) for k in range(len(parts), 0, -1)
                     if ".".join(parts[:k]) in device_map), None)

    assert [n for n in names if home(n) is None] == []
    assert all(model.get_submodule(m) is not None for m in device_map)
