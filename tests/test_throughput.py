"""planner.throughput: FLOP accounting and the ordering it gives candidates."""

from __future__ import annotations

import pytest

from planner.hardware import lookup_gpu
from planner.model import load_model_spec
from planner.throughput import flops_per_token, tokens_per_second


@pytest.fixture(scope="module")
def llama():
    return load_model_spec("meta-llama/Llama-3.1-8B")


def test_full_finetune_is_6n_plus_attention(llama):
    linear, attention = flops_per_token(llama, seq_len=2048, full_finetune=True, lora_params=0,
                                        gradient_checkpointing="none")
    n_matmul = llama.num_params - llama.vocab_size * llama.hidden_size  # lookups are not matmuls
    n_matmul -= llama.params_breakdown()["norms"]
    assert linear == pytest.approx(6 * n_matmul, rel=1e-3)
    q = llama.num_attention_heads * llama.head_dim
    assert attention == 12 * llama.num_layers * q * 2048


def test_lora_skips_weight_gradients_and_recompute_adds_forward(llama):
    full, _ = flops_per_token(llama, seq_len=2048, full_finetune=True, lora_params=0,
                              gradient_checkpointing="none")
    lora, _ = flops_per_token(llama, seq_len=2048, full_finetune=False, lora_params=0,
                              gradient_checkpointing="none")
    ckpt, _ = flops_per_token(llama, seq_len=2048, full_finetune=False, lora_params=0,
                              gradient_checkpointing="hf")
    assert lora == pytest.approx(full * 4 / 6)
    head = llama.vocab_size * llama.hidden_size
    assert ckpt - lora == pytest.approx(2 * (full / 6 - head))  # one more forward of the layers


def test_orderings(llama):
    h100, a100, l4, t4 = (lookup_gpu(n) for n in ("H100-80GB", "A100-80GB", "L4", "T4"))
    kw = dict(seq_len=2048, micro_batch_size=4, gradient_checkpointing="none")
    assert tokens_per_second(llama, h100, quantization="bf16", **kw) > \
        tokens_per_second(llama, a100, quantization="bf16", **kw)
    # FP8 speeds up only where there are FP8 tensor cores.
    assert tokens_per_second(llama, h100, quantization="fp8", **kw) > \
        tokens_per_second(llama, h100, quantization="bf16", **kw)
    assert tokens_per_second(llama, a100, quantization="fp8", **kw) == \
        tokens_per_second(llama, a100, quantization="bf16", **kw)
    # 4-bit pays dequantization; recomputation costs time; bigger micro-batches amortize.
    assert tokens_per_second(llama, l4, quantization="nf4", **kw) < \
        tokens_per_second(llama, l4, quantization="bf16", **kw)
    assert tokens_per_second(llama, l4, quantization="bf16", seq_len=2048, micro_batch_size=4,
                             gradient_checkpointing="hf") < tokens_per_second(llama, l4, quantization="bf16", **kw)
    small = tokens_per_second(llama, l4, quantization="nf4", seq_len=256, micro_batch_size=1)
    big = tokens_per_second(llama, l4, quantization="nf4", seq_len=256, micro_batch_size=8)
    assert big > small
    assert tokens_per_second(llama, t4, quantization="fp16", **kw) > 0


def test_fp8_speedup_only_on_unsloth_fp8_path():
    """The row-wise FP8 linear measured no faster than bf16 on an H200 (docs/gpu-measurements.md):
    no FP8 speedup for fp8_path="rowwise", nor on cc 8.9 where that is the path the plan uses."""
    from planner.hardware import lookup_gpu
    from planner.model import load_model_spec

    spec = load_model_spec("meta-llama/Llama-3.1-8B")
    kw = dict(seq_len=2048, micro_batch_size=2)
    h100 = lookup_gpu("H100-80GB")
    bf16 = tokens_per_second(spec, h100, quantization="bf16", **kw)
    assert tokens_per_second(spec, h100, quantization="fp8", **kw) > bf16
    assert tokens_per_second(spec, h100, quantization="fp8", fp8_path="rowwise", **kw) == bf16
    l4 = lookup_gpu("L4")
    assert tokens_per_second(spec, l4, quantization="fp8", **kw) == \
        tokens_per_second(spec, l4, quantization="bf16", **kw)
