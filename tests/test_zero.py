"""ZeRO-3 sharded placement: the DeepSpeed config and a real 2-process ZeRO-3 QLoRA run on CPU.

DeepSpeed 0.19 picks its CPU accelerator when there is no GPU and talks over gloo (it JIT-builds a
small shared-memory op with g++ the first time), so the run below is the real thing, not a stand-in.
Through RayQuantTrainer, a ZeRO-3 run whose rank 1 is killed (SIGKILL) after step 3 resumes from
the step-2 checkpoint (every rank's shard) to the same adapter, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from planner.plan import JobSpec, MemoryBreakdown, NodePlan, PlanError, TrainingPlan, WorkerAssignment
from planner.atomic import write_atomically
from rayquant.zero import bnb_config_kwargs, check_zero3_plan, zero3_config, zero3_problems
from train_callbacks import free_port


def zero_plan(key="A10G:1", quantization="nf4", micro=2, accum=1, optimizer="adamw_torch",
              placement="zero3", backend="hf", compute_dtype="bfloat16", nodes=2):
    return NodePlan(
        node_type=key, gpu=key.split(":")[0], nodes=nodes, gpus_per_node=1, quantization=quantization,
        compute_dtype=compute_dtype, micro_batch_size=micro, gradient_accumulation_steps=accum,
        optimizer=optimizer, gradient_checkpointing="hf", placement=placement, backend=backend,
        workers_per_node=1, gpus_per_worker=1, peak_memory_bytes=1, memory_budget_bytes=2,
        breakdown=MemoryBreakdown(1, 0, 0, 0, 0, 0, 0), tokens_per_second=1.0, reasons={})


def plan_of(*node_plans):
    workers = [WorkerAssignment(0, p.node_type, n, 0) for p in node_plans for n in range(p.nodes)]
    workers = [WorkerAssignment(r, w.node_type, w.node_index, 0) for r, w in enumerate(workers)]
    return TrainingPlan("tiny", {}, JobSpec(backend="hf"), node_plans, workers)


def test_nf4_weights_are_stored_in_the_dtype_zero_shards():
    kwargs = bnb_config_kwargs(zero_plan())
    assert kwargs["bnb_4bit_quant_storage"] == "bfloat16" == kwargs["bnb_4bit_compute_dtype"]
    assert kwargs["load_in_4bit"] and kwargs["bnb_4bit_quant_type"] == "nf4"
    # fp16 compute (no bf16 on the GPU): storage follows, so ZeRO still flattens one dtype.
    assert bnb_config_kwargs(zero_plan(compute_dtype="float16"))["bnb_4bit_quant_storage"] == "float16"
    assert bnb_config_kwargs(zero_plan(quantization="bf16")) is None


def test_config_is_stage_3_with_auto_batch_values_filled_by_transformers():
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    config = zero3_config(zero_plan(micro=2, accum=3))
    assert config["zero_optimization"]["stage"] == 3
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert "zero_allow_untested_optimizer" not in config
    hf = HfTrainerDeepSpeedConfig(json.loads(json.dumps(config)))
    assert hf.is_zero3() and hf.is_auto("train_micro_batch_size_per_gpu")
    offload = zero3_config(zero_plan(), offload_optimizer=True, offload_params=True)["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == offload["offload_param"]["device"] == "cpu"


def test_bitsandbytes_optimizers_are_allowed_explicitly():
    assert zero3_config(zero_plan(optimizer="adamw_8bit"))["zero_allow_untested_optimizer"] is True


def test_non_zero3_node_plans_are_refused():
    with pytest.raises(PlanError, match="not zero3"):
        zero3_config(zero_plan(placement="per-gpu"))


def test_plan_problems_are_all_named():
    assert zero3_problems(plan_of(zero_plan())) == []
    bad = plan_of(zero_plan("A10G:1", backend="unsloth", quantization="fp8"),
                  zero_plan("L4:1", micro=4), zero_plan("T4:1", placement="per-gpu", nodes=1))
    problems = zero3_problems(bad)
    text = "\n".join(problems)
    assert "every node type" in text and "backend 'hf'" in text and "'fp8'" in text
    assert "share micro-batch" in text
    with pytest.raises(PlanError, match="rayquant plan --backend hf"):
        check_zero3_plan(bad)


def test_config_file_is_written_atomically(tmp_path):
    path = tmp_path / "ds" / "zero3.json"
    write_atomically(path, json.dumps(zero3_config(zero_plan()), indent=2))
    assert json.loads(path.read_text())["zero_optimization"]["stage"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["zero3.json"]


# A 2-process ZeRO-3 QLoRA run: transformers Trainer + PEFT + bitsandbytes NF4 with bf16 storage,
# DeepSpeed on its CPU accelerator over gloo. Each rank reports what ZeRO did to the weights.
_RUN = textwrap.dedent("""
    import json, os, sys
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer,
                              TrainingArguments, DataCollatorForLanguageModeling)
    from rayquant.zero import bnb_config_kwargs, zero3_config
    from planner.plan import NodePlan, MemoryBreakdown

    model_dir, out_dir = sys.argv[1:3]
    rank = int(os.environ["RANK"])
    plan = NodePlan(node_type="CPU:1", gpu="CPU", nodes=2, gpus_per_node=1, quantization="nf4",
                    compute_dtype="bfloat16", micro_batch_size=2, gradient_accumulation_steps=2,
                    optimizer="adamw_torch", gradient_checkpointing="none", placement="zero3",
                    backend="hf", workers_per_node=1, gpus_per_worker=1, peak_memory_bytes=1,
                    memory_budget_bytes=2, breakdown=MemoryBreakdown(1, 0, 0, 0, 0, 0, 0),
                    tokens_per_second=1.0, reasons={})
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=plan.micro_batch_size,
                             gradient_accumulation_steps=plan.gradient_accumulation_steps, max_steps=4,
                             learning_rate=1e-2, bf16=True, use_cpu=True, deepspeed=zero3_config(plan),
                             report_to=[], logging_steps=1, save_strategy="no", seed=0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=BitsAndBytesConfig(**bnb_config_kwargs(plan)),
                                                 dtype=torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj.weight
    report = {"base_class": type(q).__name__, "base_dtype": str(q.dtype), "base_numel": q.numel()}
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    texts = [("the cat sat on the mat " * 4) if i % 2 else ("one two three four " * 4) for i in range(64)]
    ds = Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"])
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    result = trainer.train()
    base = trainer.model_wrapped.module.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    # What this rank holds of the base: its shards of every base parameter (packed 4-bit codes in
    # bf16 storage and the 16-bit rest), and the QuantStates, which are no parameters.
    frozen = [p for p in trainer.model_wrapped.module.parameters() if not p.requires_grad]
    import bitsandbytes as bnb

    states = [m.weight.quant_state for m in trainer.model_wrapped.module.modules()
              if isinstance(m, bnb.nn.Linear4bit)]  # not PEFT's LoRA wrapper of one
    state_tensors = [t for q in states for t in (q.absmax, q.code)
                     + ((q.offset, q.state2.absmax, q.state2.code) if q.nested else ())]
    report.update(
        base_param_bytes=sum(p.ds_numel * p.ds_tensor.element_size() for p in frozen),
        base_shard_bytes=sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in frozen),
        base_params=len(frozen),
        quant_state_bytes=sum(t.numel() * t.element_size() for t in state_tensors))
    report.update(
        engine=type(trainer.model_wrapped).__name__,
        zero_stage=trainer.model_wrapped.zero_optimization_stage(),
        shard_numel=base.ds_tensor.numel(), full_numel=base.ds_numel,
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        global_step=trainer.state.global_step)
    trainer.save_model(os.path.join(out_dir, "adapter"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    # A clean shutdown: left to interpreter exit, gloo's threads can abort a rank ("terminate called
    # without an active exception", SIGABRT) after it finished.
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
""")


def test_zero3_qlora_trains_on_two_cpu_processes(tiny_llama_dir, tmp_path):
    script = tmp_path / "zero3_run.py"
    script.write_text(_RUN)
    # The CPU run on any machine: on a GPU box DeepSpeed would pick CUDA while the script trains on CPU.
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(script), str(tiny_llama_dir), str(tmp_path / "out")],
        env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        # NF4 packed into bf16 storage: half a byte per weight means a quarter as many bf16 elements.
        assert rep["base_class"] == "Params4bit" and rep["base_dtype"] == "torch.bfloat16"
        assert rep["engine"] == "DeepSpeedEngine" and rep["zero_stage"] == 3
        # ZeRO-3 holds only this rank's half of each packed 4-bit weight.
        assert rep["shard_numel"] == -(-rep["full_numel"] // 2)
        assert rep["global_step"] == 4
    # The ranks all-reduce one loss and step together.
    assert reports[0]["losses"] == reports[1]["losses"]
    assert reports[0]["losses"][-1] < reports[0]["losses"][0]

    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero; training moved it

    # The planner's ZeRO-3 weight model against what DeepSpeed really left each rank: the quant
    # states whole, every base parameter (packed codes included) split in two, no fp32 upcast.
    from planner.memory.weights import _quant_state_bytes, layer_groups, weight_bytes
    from planner.model import load_model_spec

    tiny = load_model_spec(str(tiny_llama_dir))
    states = sum(n * _quant_state_bytes(x, "nf4", True) for x, n in layer_groups(tiny))
    whole = weight_bytes(tiny, quantization="nf4", double_quant=True, backend="zero3", protected_bytes=0)
    for rep in reports:
        assert rep["quant_state_bytes"] == states
        assert rep["base_param_bytes"] == whole - states
        # ceil per parameter: at most one 2-byte element of padding each.
        assert 0 <= rep["base_shard_bytes"] - (whole - states) / 2 <= 2 * rep["base_params"]


# -- ZeRO-3 through RayQuantTrainer: 2 Ray Train workers on CPU, the hf backend, NF4 --------------
E2E_STEPS = 6


def _zero3_cpu_plan() -> TrainingPlan:
    node = NodePlan(
        node_type="CPU:2", gpu="CPU", nodes=1, gpus_per_node=2, quantization="nf4", compute_dtype="bfloat16",
        micro_batch_size=2, gradient_accumulation_steps=1, optimizer="adamw_torch",
        gradient_checkpointing="hf", placement="zero3", backend="hf", workers_per_node=2, gpus_per_worker=1,
        peak_memory_bytes=2**30, memory_budget_bytes=4 * 2**30, breakdown=MemoryBreakdown(1, 1, 1, 1, 1, 1, 1),
        tokens_per_second=500.0, reasons={"test": "hand-built ZeRO-3 plan"})
    job = JobSpec(seq_len=128, global_batch_size=4, lora_rank=8, lora_alpha=16, quantization="nf4",
                  optimizer="adamw_torch", backend="hf")
    return TrainingPlan(model="rayquant/tiny-llama", model_summary={"name": "tiny-llama"}, job=job,
                        node_plans=(node,), workers=(WorkerAssignment(0, "CPU:2", 0, 0),
                                                     WorkerAssignment(1, "CPU:2", 0, 1)))


def _zero3_fit(root, name, callbacks):
    from rayquant.trainer import RayQuantTrainer

    return RayQuantTrainer(
        model="rayquant/tiny-llama", dataset="examples/data/tiny_alpaca.jsonl", plan=_zero3_cpu_plan(),
        sft={"max_steps": E2E_STEPS, "learning_rate": 1e-2, "logging_steps": 1, "seed": 0, "backend": "hf"},
        run={"name": name, "storage_path": str(root / "runs"), "checkpoint_every_steps": 2, "max_failures": 1},
        callbacks=callbacks).fit()


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    """A ZeRO-3 run whose rank 1 is killed (SIGKILL) at the end of step 3 and resumed by Ray Train
    from the step-2 checkpoint (every rank's ZeRO shard), and the same run uninterrupted."""
    import ray

    from train_callbacks import KillOnce

    root = tmp_path_factory.mktemp("zero3-e2e")
    saved = os.environ.get("RAYQUANT_CACHE")
    os.environ["RAYQUANT_CACHE"] = str(root / "cache")
    try:
        killed = _zero3_fit(root, "zero3", [KillOnce(3, rank=1, marker=str(root / "killed"),
                                                      run_dir=str(root / "runs" / "zero3"), checkpoint_step=2)])
        reference = _zero3_fit(root, "zero3-reference", [])
    finally:
        if saved is None:
            os.environ.pop("RAYQUANT_CACHE", None)
        else:
            os.environ["RAYQUANT_CACHE"] = saved
    yield killed, reference, root
    ray.shutdown()


@pytest.fixture(scope="module")
def zero3_run(zero3_runs):
    killed, _, root = zero3_runs
    return killed, root


@pytest.mark.ray
def test_zero3_resumes_a_killed_worker_to_the_uninterrupted_adapter(zero3_runs):
    from train_callbacks import assert_same_training

    killed, reference, root = zero3_runs
    assert json.loads((root / "killed").read_text())["step"] == 3
    assert [w["resumed_from_step"] for w in killed.manifest["workers"]] == [2, 2]
    assert [w["resumed_from_step"] for w in reference.manifest["workers"]] == [None, None]
    # Both ranks gathered the same whole adapter, and it is the uninterrupted run's, bit for bit.
    assert len({w["adapter_sha256"] for w in killed.manifest["workers"]}) == 1
    assert_same_training(killed, reference)


@pytest.mark.ray
def test_zero3_plan_trains_through_ray_train(zero3_run):
    result, _ = zero3_run
    workers = result.manifest["workers"]
    assert [w["placement"] for w in workers] == ["zero3", "zero3"]
    assert [w["engine"] for w in workers] == ["DeepSpeedEngine"] * 2
    assert [w["steps"] for w in workers] == [E2E_STEPS] * 2
    assert all(w["quantization"]["used"] == "nf4" for w in workers)
    loss = result.manifest["loss"]
    assert loss["points"] == E2E_STEPS
    assert loss["last_fifth_mean"] < loss["first_fifth_mean"], loss


@pytest.mark.ray
def test_zero3_ranks_saved_the_same_whole_adapter(zero3_run):
    from safetensors.torch import load_file

    from rayquant.adapters import adapter_sha256

    result, _ = zero3_run
    assert {w["adapter_sha256"] for w in result.manifest["workers"]} == {adapter_sha256(result.adapter_dir)}
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    # Gathered from the ZeRO-3 shards: full LoRA shapes (rank 8 x hidden), and B moved off zero.
    a = [t for k, t in adapter.items() if "lora_A" in k]
    b = [t for k, t in adapter.items() if "lora_B" in k]
    assert a and all(t.shape[0] == 8 and t.numel() > 8 for t in a)
    assert b and all(t.shape[1] == 8 for t in b) and any(t.abs().sum() > 0 for t in b)


@pytest.mark.ray
def test_zero3_adapter_loads_with_peft_and_changes_outputs(zero3_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, root = zero3_run
    base_dir = root / "cache" / "models" / "tiny-llama"
    ids = AutoTokenizer.from_pretrained(str(base_dir))("### Instruction:\nname the cat\n\n### Response:\n",
                                                       return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(result.adapter_dir))(ids).logits
    assert (after - before).abs().max().item() > 1e-3


# -- QLoRA + ZeRO-3 chosen by the planner, trained through RayQuantTrainer on 2 CPU workers ---------
# Two 1-CPU "nodes" whose device memory holds the tiny model neither whole nor as 16-bit shards: the
# search must pick ZeRO-3 with a 4-bit base packed into bf16 storage. The memory is the smallest (in
# 8 KiB steps) where it does, so the test follows the memory model rather than a hard-coded size.
PLANNED_STEPS = 6


def _planned_zero3(tiny_llama_dir) -> TrainingPlan:
    from planner.hardware import node_types_from_dicts
    from planner.model import load_model_spec
    from planner.search import make_plan

    tiny = load_model_spec(str(tiny_llama_dir))
    job = JobSpec(seq_len=128, global_batch_size=4, lora_rank=8, lora_alpha=16, backend="hf")
    for kib in range(256, 8192, 8):
        inventory = node_types_from_dicts([{"gpu": "CPU", "gpus_per_node": 1, "count": 2,
                                            "host_memory_gib": kib / 2**20}])
        try:
            plan = make_plan(tiny, inventory, job)
        except PlanError:
            continue
        p = plan.node_plans[0]
        if p.placement == "zero3" and p.quantization in ("nf4", "dynamic-4bit"):
            return plan
        if p.placement == "per-gpu":
            break  # more memory only holds the model whole
    pytest.fail("no device memory makes the planner choose 4-bit ZeRO-3 for the tiny model")


def test_planner_picks_4bit_zero3_when_16bit_shards_do_not_fit(tiny_llama_dir):
    from planner.memory import estimate_memory

    plan = _planned_zero3(tiny_llama_dir)
    p = plan.node_plans[0]
    assert (p.placement, p.backend, p.quantization, p.compute_dtype) == ("zero3", "hf", "dynamic-4bit",
                                                                        "bfloat16")
    assert "so ZeRO-3 shards them (QLoRA + ZeRO-3)" in p.reasons["quantization"]
    assert "(does not fit: " in p.reasons["quantization"]  # the 16-bit scheme, sharded too
    assert zero3_problems(plan) == []
    assert bnb_config_kwargs(p)["bnb_4bit_quant_storage"] == "bfloat16"
    # Why: the 16-bit shards of the same configuration exceed the budget, the 4-bit ones do not.
    from planner.hardware import cpu_device

    kw = dict(backend="hf", seq_len=128, micro_batch_size=p.micro_batch_size, lora_rank=8,
              gradient_checkpointing=p.gradient_checkpointing, optimizer=p.optimizer, num_shards=2)
    from planner.model import load_model_spec

    tiny, device = load_model_spec(str(tiny_llama_dir)), cpu_device(2**20)  # only its cc/speed matter
    assert estimate_memory(tiny, device, quantization="fp16", **kw).peak_bytes > p.memory_budget_bytes
    assert estimate_memory(tiny, device, quantization="nf4", **kw).peak_bytes <= p.memory_budget_bytes


@pytest.fixture(scope="module")
def planned_zero3_run(tiny_llama_dir, tmp_path_factory):
    import ray

    from rayquant.trainer import RayQuantTrainer

    root = tmp_path_factory.mktemp("zero3-planned")
    saved = os.environ.get("RAYQUANT_CACHE")
    os.environ["RAYQUANT_CACHE"] = str(root / "cache")
    try:
        plan = _planned_zero3(tiny_llama_dir)
        result = RayQuantTrainer(
            model="rayquant/tiny-llama", dataset="examples/data/tiny_alpaca.jsonl", plan=plan,
            sft={"max_steps": PLANNED_STEPS, "learning_rate": 1e-2, "logging_steps": 1, "seed": 0,
                 "backend": "hf"},
            run={"name": "zero3-planned", "storage_path": str(root / "runs"), "checkpoint_every_steps": 100,
                 "max_failures": 0}).fit()
    finally:
        if saved is None:
            os.environ.pop("RAYQUANT_CACHE", None)
        else:
            os.environ["RAYQUANT_CACHE"] = saved
    yield plan, result
    ray.shutdown()


@pytest.mark.ray
def test_planned_qlora_zero3_trains_and_both_ranks_hold_the_same_adapter(planned_zero3_run):
    from safetensors.torch import load_file

    from rayquant.adapters import adapter_sha256

    plan, result = planned_zero3_run
    workers = result.manifest["workers"]
    assert [w["placement"] for w in workers] == ["zero3", "zero3"]
    assert [w["engine"] for w in workers] == ["DeepSpeedEngine"] * 2
    assert [w["steps"] for w in workers] == [PLANNED_STEPS] * 2
    # The 4-bit base really was 4-bit on both ranks, before and after training.
    for w in workers:
        q = w["quantization"]
        assert q["planned"] == q["used"] == "dynamic-4bit" and q["modules_after_training"]["linear4bit"] > 0
        # Loaded whole into host RAM, then partitioned before LoRA and the engine: half each.
        assert 0 <= q["zero3_shard_bytes"] - q["zero3_base_bytes"] / 2 <= 64
    loss = result.manifest["loss"]
    assert loss["last_fifth_mean"] < loss["first_fifth_mean"], loss
    # Every rank gathered the ZeRO-3 shards of the adapter: one hash, that of the adapter written.
    assert {w["adapter_sha256"] for w in workers} == {adapter_sha256(result.adapter_dir)}
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    b = [t for k, t in adapter.items() if "lora_B" in k]
    assert b and all(t.shape[1] == 8 for t in b) and any(t.abs().sum() > 0 for t in b)
