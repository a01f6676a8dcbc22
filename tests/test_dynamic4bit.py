"""Dynamic 4-bit on CPU with real bitsandbytes: byte accounting, selection under a budget, real loads."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rayquant.dynamic4bit import (
    ModuleError,
    bnb_quantization_config,
    measure_errors_from_checkpoint,
    measure_errors_from_model,
    protect_cost_bytes,
    restore_protected_modules,
    select_protected,
)
from planner.tensor_bytes import nf4_bytes


@pytest.mark.parametrize("shape", [(64, 64), (128, 96), (512, 256), (4096, 64)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_match_bitsandbytes_storage(shape, double_quant):
    import bitsandbytes.functional as bnbf

    w = torch.randn(*shape, dtype=torch.bfloat16)
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    real = q.numel() * q.element_size() + state.absmax.numel() * state.absmax.element_size()
    if double_quant:
        real += state.state2.absmax.numel() * state.state2.absmax.element_size()
    assert nf4_bytes(w.numel(), double_quant) == real
    assert protect_cost_bytes(w.numel(), double_quant) == 2 * w.numel() - real


_errors = st.lists(
    st.builds(lambda layer, rows, err: (layer, rows * 64, err),
              st.integers(0, 5), st.integers(1, 64), st.floats(0.0, 1.0)),
    min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(raw=_errors, budget=st.integers(0, 200_000), double_quant=st.booleans())
def test_selection_never_exceeds_budget_and_leaves_nothing_that_fits(raw, budget, double_quant):
    errors = [ModuleError(f"model.layers.{layer}.mlp.m{i}", layer, numel, err)
              for i, (layer, numel, err) in enumerate(raw)]
    p = select_protected(errors, budget, double_quant)
    cost = {e.name: protect_cost_bytes(e.numel, double_quant) for e in errors}
    assert p.cost_bytes == sum(cost[n] for n in p.protected) <= budget
    assert len(set(p.protected)) == len(p.protected)
    left = budget - p.cost_bytes
    assert all(cost[e.name] > left for e in errors if e.name not in p.protected)
    # Edge layers come first: a middle module is protected only if every edge module that is left
    # out could not have fitted at the time it was considered (it is bigger than the budget).
    first, last = min(e.layer for e in errors), max(e.layer for e in errors)
    middle_taken = any(e.layer not in (first, last) and e.name in p.protected for e in errors)
    if middle_taken:
        for e in errors:
            if e.layer in (first, last) and e.name not in p.protected:
                assert cost[e.name] > budget - sum(cost[n] for n in p.protected
                                                   if n.split(".")[2] in (str(first), str(last)))


def test_selection_order_edges_then_error():
    mk = lambda layer, name, err: ModuleError(f"model.layers.{layer}.{name}", layer, 64 * 64, err)
    errors = [mk(0, "q", 0.01), mk(3, "q", 0.02), mk(1, "q", 0.5), mk(2, "q", 0.3), mk(2, "k", 0.1)]
    one = protect_cost_bytes(64 * 64)
    assert select_protected(errors, 2 * one).protected == ("model.layers.3.q", "model.layers.0.q")
    p = select_protected(errors, 4 * one)
    assert p.protected[2:] == ("model.layers.1.q", "model.layers.2.q")
    assert "NF4 error 0.5000" in p.reasons["model.layers.1.q"]
    assert select_protected(errors, one - 1).protected == ()
    assert select_protected([], 10).protected == ()
    with pytest.raises(ValueError, match=">= 0"):
        select_protected(errors, -1)


@pytest.fixture(scope="module")
def four_layer_llama(tmp_path_factory):
    """A 4-layer tiny Llama whose layer-2 down_proj has outliers, so NF4 hurts it most."""
    from safetensors.torch import load_file, save_file

    from rayquant.tiny import make_tiny_model

    d = make_tiny_model(tmp_path_factory.mktemp("d4") / "llama4", arch="llama", num_hidden_layers=4)
    path = d / "model.safetensors"
    tensors = load_file(str(path))
    w = tensors["model.layers.2.mlp.down_proj.weight"].float()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, w.numel(), (w.numel() // 64,), generator=gen)
    w.view(-1)[idx] *= 40.0  # about one outlier per NF4 block: its absmax swamps the other 63 values
    tensors["model.layers.2.mlp.down_proj.weight"] = w.to(torch.bfloat16)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return d


def test_measured_errors_rank_the_outlier_module_first(four_layer_llama):
    errors = measure_errors_from_checkpoint(four_layer_llama, device="cpu")
    names = {e.name for e in errors}
    assert len(errors) == 4 * 7 and "model.layers.0.self_attn.q_proj" in names
    assert not any("lm_head" in n or "embed" in n or "norm" in n for n in names)
    worst = max(errors, key=lambda e: e.relative_error)
    assert worst.name == "model.layers.2.mlp.down_proj"
    # The loaded model gives the same numbers as reading the files.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(four_layer_llama), dtype=torch.bfloat16)
    from_model = {e.name: e.relative_error for e in measure_errors_from_model(model)}
    assert from_model == pytest.approx({e.name: e.relative_error for e in errors}, rel=1e-6)


def _load_4bit(model_dir, protected):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.bfloat16, device_map="cpu",
        quantization_config=bnb_quantization_config(protected, torch.bfloat16))


def _logit_error(model, ref_logits, ids):
    with torch.no_grad():
        out = model(ids).logits.float()
    return ((out - ref_logits).norm() / ref_logits.norm()).item()


def test_protected_modules_stay_16bit_and_lower_the_error(four_layer_llama):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    errors = measure_errors_from_checkpoint(four_layer_llama, device="cpu")
    edge_cost = sum(protect_cost_bytes(e.numel) for e in errors if e.layer in (0, 3))
    outlier = next(e for e in errors if e.name == "model.layers.2.mlp.down_proj")
    budget = edge_cost + protect_cost_bytes(outlier.numel)
    protection = select_protected(errors, budget)
    assert protection.cost_bytes <= budget
    assert "model.layers.2.mlp.down_proj" in protection.protected
    assert len(protection.protected) == 2 * 7 + 1

    dyn = _load_4bit(four_layer_llama, protection.protected)
    plain = _load_4bit(four_layer_llama, [])
    for name, module in dyn.named_modules():
        if name in protection.protected:
            assert type(module) is nn.Linear and module.weight.dtype == torch.bfloat16
        elif name.endswith("_proj"):
            assert isinstance(module, bnb.nn.Linear4bit)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules()) == 4 * 7

    ref = AutoModelForCausalLM.from_pretrained(str(four_layer_llama), dtype=torch.bfloat16)
    ids = torch.randint(0, ref.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_logits = ref(ids).logits.float()
    assert _logit_error(dyn, ref_logits, ids) < _logit_error(plain, ref_logits, ids)
    # The protected weights are the checkpoint's own, not a dequantized copy.
    assert torch.equal(dyn.get_submodule("model.layers.2.mlp.down_proj").weight,
                       ref.get_submodule("model.layers.2.mlp.down_proj").weight)


def test_unsloth_cpu_load_then_restore(four_layer_llama):
    """Unsloth's CPU loader drops a caller's quantization_config; restore_protected_modules repairs it."""
    import bitsandbytes as bnb
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(four_layer_llama), max_seq_length=64,
                                                 load_in_4bit=True, dtype=torch.bfloat16)
    protected = ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"]
    assert isinstance(model.get_submodule(protected[1]), bnb.nn.Linear4bit)
    assert restore_protected_modules(model, four_layer_llama, protected) == sorted(protected)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in protected)
    assert restore_protected_modules(model, four_layer_llama, protected) == []
    ids = torch.randint(0, 100, (1, 16))
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_no_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="To fix"):
        measure_errors_from_checkpoint(tmp_path, device="cpu")


# -- through the worker's loader (rayquant.loading.load_for_training), no Ray ----------------------
def _plan(**overrides):
    from planner.plan import JobSpec, MemoryBreakdown, NodePlan

    node = NodePlan(
        node_type="CPU:1", gpu="CPU", nodes=1, gpus_per_node=1, quantization="dynamic-4bit",
        compute_dtype="bfloat16", micro_batch_size=1, gradient_accumulation_steps=1,
        optimizer="adamw_8bit", gradient_checkpointing="unsloth", placement="per-gpu", backend="unsloth",
        workers_per_node=1, gpus_per_worker=1, peak_memory_bytes=2**30, memory_budget_bytes=4 * 2**30,
        breakdown=MemoryBreakdown(1, 1, 1, 1, 1, 1, 1), tokens_per_second=1.0,
        reasons={"test": "hand-built"})
    from dataclasses import replace

    return replace(node, **overrides), JobSpec(seq_len=64, global_batch_size=1, lora_rank=8)


@pytest.mark.parametrize("backend,checkpointing", [("unsloth", "unsloth"), ("hf", "hf")])
def test_load_for_training_protects_within_the_plans_budget(tiny_llama_dir, backend, checkpointing):
    """The worker's own loader: it measures the errors, keeps the chosen modules 16-bit under LoRA,
    quantizes the rest to NF4 and reports the protected list and its cost in `info`."""
    import bitsandbytes as bnb

    from rayquant.loading import load_for_training, quantized_module_counts

    from planner.memory.protected import protection_weight_bytes

    errors = measure_errors_from_checkpoint(tiny_llama_dir, device="cpu")
    per = protection_weight_bytes(backend)  # hf: the protected modules end up fp32
    order = select_protected(errors, 2**40, weight_bytes=per).protected
    numel = {e.name: e.numel for e in errors}

    def cost(n):
        return protect_cost_bytes(numel[n], weight_bytes=per)

    budget = sum(cost(n) for n in order[:2]) + cost(order[2]) - 1
    want = select_protected(errors, budget, weight_bytes=per)  # two modules; the third misses by one byte
    node, job = _plan(protected_budget_bytes=budget, backend=backend, gradient_checkpointing=checkpointing)

    model, _, info = load_for_training(str(tiny_llama_dir), node, job, device_map={"": "cpu"})

    assert info["quantization_used"] == "dynamic-4bit" and len(want.protected) >= 2
    assert info["protected_modules"] == list(want.protected)
    assert info["protected_cost_bytes"] == want.cost_bytes <= info["protected_budget_bytes"] == budget
    assert set(info["reasons"]) == set(want.protected) and info["candidates"] == len(errors)
    assert info["linear4bit_modules"] == len(errors) - len(want.protected)
    assert quantized_module_counts(model) == {"linear4bit": len(errors) - len(want.protected),
                                              "fp8_rowwise": 0}
    base = model.get_base_model()
    for e in errors:
        layer = base.get_submodule(e.name)
        layer = getattr(layer, "base_layer", layer)  # under LoRA
        if e.name in want.protected:
            assert type(layer) is nn.Linear, e.name
        else:
            assert isinstance(layer, bnb.nn.Linear4bit), e.name
    # Unsloth's CPU loader drops the skip list, so the worker restores the protected modules;
    # transformers honours it. The hf path's kbit preparation upcasts them to fp32 (docs/quantization.md).
    restored = {"unsloth": len(want.protected), "hf": 0}[backend]
    assert info["protected_restored_after_load"] == restored
    bytes_per_param = {"unsloth": 2, "hf": 4}[backend]
    assert info["protected_weight_bytes"] == bytes_per_param * sum(numel[n] for n in want.protected)


def test_a_4bit_base_trains_fp32_adapters_like_a_16bit_one(tiny_llama_dir):
    """TRL keeps a 4-bit base's adapters in bf16; the worker's trainer keeps them fp32, the dtype a
    16-bit (or FP8) rank has, so heterogeneous DDP all-reduces buffers of one size."""
    import tempfile

    from rayquant.data import prepare
    from rayquant.loading import load_for_training
    from rayquant.contract import SftSettings
    from rayquant.worker.sft import make_sft_trainer

    node, job = _plan(protected_budget_bytes=0, quantization="nf4")
    model, tok, _ = load_for_training(str(tiny_llama_dir), node, job, device_map={"": "cpu"})
    data = prepare("examples/data/tiny_alpaca.jsonl")
    settings = SftSettings(max_steps=1, seq_len=128, dataset_format=data.format, learning_rate=1e-3,
                           lr_scheduler="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                           logging_steps=1, seed=0)
    from rayquant.tokens import tokenize

    rows = tokenize(data.select(range(2)), tok, 128).dataset  # what the driver hands every worker
    trainer, _ = make_sft_trainer(model, tok, rows, node, settings, tempfile.mkdtemp())
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    trainer.train()
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}


def test_the_planner_and_the_worker_share_one_rule(four_layer_llama):
    """The worker selects with planner.memory.protected's rule; the planner, which cannot read the
    weights, finds the same candidates in the model's config and, with a budget for the edge layers,
    the same modules at the same cost."""
    import planner.memory.protected as rule
    import rayquant.dynamic4bit as worker
    from planner.model import load_model_spec

    assert worker.select_protected is rule.select_protected
    assert worker.protect_cost_bytes is rule.protect_cost_bytes
    errors = measure_errors_from_checkpoint(four_layer_llama, device="cpu")
    spec = load_model_spec(str(four_layer_llama))
    planned = rule.candidate_modules(spec)
    assert sorted((e.name, e.numel) for e in planned) == sorted((e.name, e.numel) for e in errors)
    edges = [e for e in errors if e.layer in (0, 3)]
    budget = sum(protect_cost_bytes(e.numel) for e in edges)
    real = select_protected(errors, budget)
    assert set(real.protected) == {e.name for e in edges}
    predicted = rule.planned_protection(spec, budget)
    assert set(predicted.protected) == set(real.protected) and predicted.cost_bytes == real.cost_bytes
    # With room for more, the non-edge names stand in for the worker's picks; both fill the budget
    # greedily, so each leaves less than one module's cost unspent and their bytes differ by less.
    largest = max(protect_cost_bytes(e.numel) for e in errors)
    budget += 2 * largest
    real, predicted = select_protected(errors, budget), rule.planned_protection(spec, budget)
    assert abs(predicted.cost_bytes - real.cost_bytes) < largest
    assert max(predicted.cost_bytes, real.cost_bytes) <= budget
    assert "layers.2.mlp.down_proj" in " ".join(real.protected)  # the outlier module, by its error


def test_estimate_and_plan_peaks_include_the_protected_modules():
    from click.testing import CliRunner

    from planner.hardware import lookup_gpu
    from rayquant import planning
    from rayquant.cli import main

    args = ["estimate", "-m", "meta-llama/Llama-3.1-8B", "-g", "L4", "--json"]
    nf4 = json.loads(CliRunner().invoke(main, args + ["--quantization", "nf4"]).output)
    dyn = json.loads(CliRunner().invoke(main, args + ["--quantization", "dynamic-4bit"]).output)
    prot = dyn["protected"]
    assert nf4["protected"] is None and prot["cost_bytes"] > 0
    assert dyn["peak_memory_bytes"] == nf4["peak_memory_bytes"] + prot["cost_bytes"]
    assert dyn["breakdown_bytes"]["weights"] == nf4["breakdown_bytes"]["weights"] + prot["cost_bytes"]
    assert sum(m["bytes"] for m in prot["modules"]) == prot["cost_bytes"] <= prot["budget_bytes"]
    # The safety margin (10%) stays free.
    assert dyn["peak_memory_bytes"] <= 0.9 * lookup_gpu("L4").memory_bytes
    assert prot["budget_bytes"] == int(0.9 * lookup_gpu("L4").memory_bytes) - nf4["peak_memory_bytes"]
    text = CliRunner().invoke(main, args[:-1] + ["--quantization", "dynamic-4bit"]).output
    assert "model.layers.0.self_attn.q_proj" in text and "first decoder layer" in text
    assert "picked by measured NF4 error" in text

    job = planning.job_spec(planning.LoraOptions(rank=16), planning.SftOptions(
        seq_len=2048, global_batch_size=8, quantization="dynamic-4bit"))
    plan = planning.make_plan("meta-llama/Llama-3.1-8B", planning.node_types(gpus="1xL4"), job)
    (node,) = plan.node_plans
    nf4_plan = planning.make_plan("meta-llama/Llama-3.1-8B", planning.node_types(gpus="1xL4"),
                                  planning.job_spec(planning.LoraOptions(rank=16), planning.SftOptions(
                                      seq_len=2048, global_batch_size=8, quantization="nf4")))
    (base,) = nf4_plan.node_plans
    assert node.micro_batch_size == base.micro_batch_size
    spent = node.peak_memory_bytes - base.peak_memory_bytes
    assert 0 < spent <= node.protected_budget_bytes
    assert node.breakdown.weights - base.breakdown.weights == spent
    assert node.peak_memory_bytes <= node.memory_budget_bytes
