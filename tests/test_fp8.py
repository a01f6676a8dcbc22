"""Row-scaled FP8 linear: numerics against 16-bit, memory, and LoRA training on top (CPU, real PEFT).

Tolerances (stated in docs/quantization.md): e4m3 keeps 3 mantissa bits, so one rounding is at most
2^-4 relative; with both the weight and the activation rounded, the output's relative Frobenius error
on Gaussian data is ~3.5% and we allow 6%. The input gradient sees only the weight rounding: ~2.5%,
allow 5%.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayquant.fp8 import (
    Fp8RowwiseLinear,
    convert_linears_to_fp8,
    fp8_path_for,
    fp8_weight_bytes,
    quantize_rowwise,
    scaled_mm_rowwise_supported,
    unsloth_fp8_problems,
)

OUTPUT_RTOL = 0.06
GRAD_RTOL = 0.05


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _layer_and_input(in_f: int, out_f: int, bias: bool, seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(torch.bfloat16)
    x = torch.randn(3, 5, in_f, dtype=torch.bfloat16)
    return lin, x


def test_scaled_mm_runs_on_cpu():
    assert scaled_mm_rowwise_supported(torch.device("cpu"))


@pytest.mark.parametrize("in_f,out_f,bias", [(64, 96, False), (128, 32, True), (40, 24, True)])
def test_forward_and_input_grad_match_16bit(in_f, out_f, bias):
    # (40, 24) is not a multiple of 16: the dequantize fallback path, which must agree just as well.
    lin, x = _layer_and_input(in_f, out_f, bias)
    fp8 = Fp8RowwiseLinear.from_linear(lin)

    x_ref = x.float().clone().requires_grad_(True)
    ref = nn.functional.linear(x_ref, lin.weight.float(), None if lin.bias is None else lin.bias.float())
    x_q = x.clone().requires_grad_(True)
    out = fp8(x_q)

    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert _rel(out, ref) < OUTPUT_RTOL
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g.to(out.dtype))
    assert x_q.grad is not None and x_q.grad.shape == x.shape
    assert _rel(x_q.grad, x_ref.grad) < GRAD_RTOL
    assert fp8.weight.grad is None and not fp8.weight.requires_grad


def test_quantize_rowwise_reconstructs_within_e4m3_rounding():
    torch.manual_seed(1)
    w = torch.randn(32, 64) * torch.logspace(-3, 2, 32).unsqueeze(1)  # rows of very different scale
    q, s = quantize_rowwise(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (32, 1)
    err = (q.float() * s - w).abs()
    # Per row, rounding error stays below 2^-4 of that row's largest magnitude (3 mantissa bits).
    assert bool((err.amax(dim=1) <= w.abs().amax(dim=1) * 2**-4 + 1e-12).all())
    zero_q, zero_s = quantize_rowwise(torch.zeros(2, 16))
    assert torch.isfinite(zero_s).all() and zero_q.float().abs().sum() == 0


def test_converted_weights_take_one_byte_per_param_plus_scales(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16)
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"}
    bf16_bytes = sum(m.weight.numel() * 2 for m in linears.values())
    params = sum(m.weight.numel() for m in linears.values())
    rows = sum(m.out_features for m in linears.values())

    converted = convert_linears_to_fp8(model)

    assert sorted(converted) == sorted(linears)
    assert fp8_weight_bytes(model) == params + 4 * rows
    assert fp8_weight_bytes(model) < 0.55 * bf16_bytes
    # Embeddings, norms and lm_head stay 16-bit.
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert isinstance(model.model.layers[0].self_attn.q_proj, Fp8RowwiseLinear)


def test_converted_model_logits_close_to_16bit(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16)
    fp8 = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16)
    convert_linears_to_fp8(fp8)
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, fp8(ids).logits
    # Two decoder layers of compounded rounding: a looser bound than one layer, still small.
    assert _rel(b, a) < 2 * OUTPUT_RTOL


def test_lora_trains_on_fp8_base(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16)
    convert_linears_to_fp8(model)
    base_before = {n: m.weight.detach().clone() for n, m in model.named_modules()
                   if isinstance(m, Fp8RowwiseLinear)}
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype != torch.float8_e4m3fn for p in trainable)
    wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped.base_layer, Fp8RowwiseLinear)

    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(25):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    for n, m in model.named_modules():
        if isinstance(m, Fp8RowwiseLinear):
            key = n.replace("base_model.model.", "", 1).replace(".base_layer", "")
            assert torch.equal(m.weight.view(torch.uint8), base_before[key].view(torch.uint8))


def test_fp8_path_by_compute_capability():
    assert fp8_path_for((9, 0)) == "unsloth"
    assert fp8_path_for((10, 0)) == "unsloth"
    assert fp8_path_for((8, 9)) == "rowwise"
    assert fp8_path_for((8, 0)) is None
    assert fp8_path_for((7, 5)) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_unsloth_fp8_problems_without_gpu_says_why():
    problems = unsloth_fp8_problems()
    assert any("no CUDA GPU" in p and "9.0" in p for p in problems)


# -- through the worker's loader (rayquant.loading.load_for_training), no Ray ----------------------
def _fp8_plan(backend: str = "unsloth"):
    from planner.plan import JobSpec, MemoryBreakdown, NodePlan

    node = NodePlan(
        node_type="CPU:1", gpu="CPU", nodes=1, gpus_per_node=1, quantization="fp8", fp8_path="rowwise",
        compute_dtype="bfloat16", micro_batch_size=1, gradient_accumulation_steps=1,
        optimizer="adamw_8bit", gradient_checkpointing="unsloth" if backend == "unsloth" else "hf",
        placement="per-gpu", backend=backend, workers_per_node=1, gpus_per_worker=1,
        peak_memory_bytes=2**30, memory_budget_bytes=4 * 2**30, breakdown=MemoryBreakdown(1, 1, 1, 1, 1, 1, 1),
        tokens_per_second=1.0, reasons={"test": "hand-built"})
    return node, JobSpec(seq_len=64, global_batch_size=1, lora_rank=8)


def test_load_for_training_rowwise_fp8_reports_its_modules(tiny_llama_dir):
    """The worker's own loader on the `rowwise` path: a 16-bit Unsloth load, every decoder
    projection converted to FP8 under LoRA, and `info` says how many and how many bytes."""
    from transformers import AutoModelForCausalLM

    from rayquant.loading import load_for_training, quantized_module_counts

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16)
    projections = {n: m for n, m in ref.named_modules() if type(m) is nn.Linear and n != "lm_head"}
    node, job = _fp8_plan()

    model, _, info = load_for_training(str(tiny_llama_dir), node, job, device_map={"": "cpu"})

    assert info["quantization_used"] == "fp8" and info["fp8_path"] == "rowwise"
    assert info["fp8_modules"] == len(projections) and info["linear4bit_modules"] == 0
    assert info["fp8_weight_bytes"] == (sum(m.weight.numel() for m in projections.values())
                                        + 4 * sum(m.out_features for m in projections.values()))
    assert "protected_modules" not in info
    assert quantized_module_counts(model) == {"linear4bit": 0, "fp8_rowwise": len(projections)}
    base = model.get_base_model()
    for name in projections:
        assert isinstance(base.get_submodule(name).base_layer, Fp8RowwiseLinear), name
    assert type(base.lm_head) is nn.Linear and base.lm_head.weight.dtype == torch.bfloat16
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


def test_hf_backend_has_no_fp8_path():
    from rayquant.loading import load_for_training

    node, job = _fp8_plan(backend="hf")
    with pytest.raises(ValueError, match="hf backend has no FP8 path.*backend=unsloth"):
        load_for_training("unused", node, job, device_map={"": "cpu"})
