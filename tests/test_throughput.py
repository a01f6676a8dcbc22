"""planner.throughput: FLOP accounting, the step's terms, and the orderings they give candidates."""

from __future__ import annotations

import pytest

from planner.hardware import lookup_gpu
from planner.model import load_model_spec
from planner.throughput import (ATTENTION_BACKWARD_FACTOR, EXPECTED_ERROR, expected_error_text,
                                flops_per_token, step_time, tokens_per_second)


@pytest.fixture(scope="module")
def llama():
    return load_model_spec("meta-llama/Llama-3.1-8B")


@pytest.fixture(scope="module")
def llama70():
    return load_model_spec("meta-llama/Llama-3.3-70B-Instruct")


def test_full_finetune_is_6n_plus_causal_attention(llama):
    linear, attention = flops_per_token(llama, seq_len=2048, full_finetune=True, lora_params=0,
                                        gradient_checkpointing="none")
    n_matmul = llama.num_params - llama.vocab_size * llama.hidden_size  # lookups are not matmuls
    n_matmul -= llama.params_breakdown()["norms"]
    assert linear == pytest.approx(6 * n_matmul, rel=1e-3)
    q = llama.num_attention_heads * llama.head_dim
    # causal flash attention: forward 2*L*q*s per token, backward 2.5x that
    assert attention == (1 + ATTENTION_BACKWARD_FACTOR) * 2 * llama.num_layers * q * 2048


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
    # FP8 speeds up nothing where there are no FP8 tensor cores.
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


def test_attention_grows_with_sequence_length(llama):
    """Same tokens per micro-step, longer sequences: attention (s^2 per sequence) takes more."""
    h100 = lookup_gpu("H100-80GB")
    short = step_time(llama, h100, quantization="bf16", seq_len=2048, micro_batch_size=16)
    long = step_time(llama, h100, quantization="bf16", seq_len=32768, micro_batch_size=1)
    assert long.terms["attention"] == pytest.approx(16 * short.terms["attention"])
    assert long.terms["gemm"] == pytest.approx(short.terms["gemm"], rel=0.01)
    assert long.tokens_per_second < short.tokens_per_second


def test_small_models_are_host_bound():
    """The H200 run: Qwen2.5-0.5B trained at a few thousand tokens/s, far below its FLOPs: the
    host's time per layer sets the step, so twice the tokens cost almost nothing more."""
    qwen, h200 = load_model_spec("Qwen/Qwen2.5-0.5B"), lookup_gpu("H200")
    one = step_time(qwen, h200, quantization="bf16", seq_len=512, micro_batch_size=1)
    assert one.terms["fixed"] > 0.5 * one.seconds
    two = step_time(qwen, h200, quantization="bf16", seq_len=512, micro_batch_size=2)
    assert two.tokens_per_second == pytest.approx(2 * one.tokens_per_second, rel=0.02)


def test_fp8_credit_is_on_gemm_time_only(llama, llama70):
    """No flat FP8 factor: FP8 shortens the forward GEMMs and pays the activation casts and the
    backward's dequantization, so the gain depends on the model's size and the sequence."""
    h100 = lookup_gpu("H100-80GB")
    kw = dict(seq_len=2048, micro_batch_size=4, gradient_checkpointing="unsloth")

    def gain(model, **over):
        args = {**kw, **over}
        return (tokens_per_second(model, h100, quantization="fp8", **args)
                / tokens_per_second(model, h100, quantization="bf16", **args))

    assert gain(llama70) > gain(llama)  # bigger GEMMs amortize the casts
    assert gain(llama70) < 1.5  # the old flat credit
    # Attention is 16-bit: long sequences dilute the gain.
    assert gain(llama70, seq_len=32768, micro_batch_size=1) < gain(llama70)
    bf16 = step_time(llama70, h100, quantization="bf16", **kw)
    fp8 = step_time(llama70, h100, quantization="fp8", **kw)
    assert fp8.terms["attention"] == bf16.terms["attention"]
    assert fp8.terms["gemm"] < bf16.terms["gemm"] and fp8.terms["fp8_casts"] > 0
    # A host-bound small model gains nothing.
    qwen = load_model_spec("Qwen/Qwen2.5-0.5B")
    assert gain(qwen, seq_len=512, micro_batch_size=1) == pytest.approx(1.0)


def test_fp8_on_ada_is_the_same_formula_and_does_not_pay_on_an_l4(llama):
    """cc 8.9 runs rayquant's row-wise FP8 linear: the same casts and FP8 forward GEMMs as Unsloth's
    path; on an L4 (300 GB/s) the casts cost more than the FP8 GEMMs save."""
    l4 = lookup_gpu("L4")
    kw = dict(seq_len=2048, micro_batch_size=4)
    assert tokens_per_second(llama, l4, quantization="fp8", **kw) < \
        tokens_per_second(llama, l4, quantization="bf16", **kw)
    assert tokens_per_second(llama, l4, quantization="fp8", fp8_path="rowwise", **kw) == \
        tokens_per_second(llama, l4, quantization="fp8", **kw)


def test_offload_costs_the_host_link(llama):
    """Unsloth's offloaded checkpointing sends each layer input over the host link: a slower link
    (PCIe gen4 against NVLink-C2C) makes it cost more, and hf checkpointing does not pay it."""
    h100, gh200 = lookup_gpu("H100-80GB"), lookup_gpu("GH200")
    kw = dict(quantization="bf16", seq_len=8192, micro_batch_size=2)
    assert step_time(llama, h100, gradient_checkpointing="hf", **kw).terms["offload"] == 0
    pcie = step_time(llama, h100, gradient_checkpointing="unsloth", **kw).terms["offload"]
    c2c = step_time(llama, gh200, gradient_checkpointing="unsloth", **kw).terms["offload"]
    assert pcie > 0 and c2c < pcie / 5


def test_all_reduce_over_the_network(llama):
    """Ring all-reduce of the adapters' gradients: 2(n-1)/n of their bytes; slower across nodes."""
    a100 = lookup_gpu("A100-80GB")
    kw = dict(quantization="bf16", seq_len=2048, micro_batch_size=4)
    one = step_time(llama, a100, **kw).terms["all_reduce"]
    two = step_time(llama, a100, data_parallel=2, **kw).terms["all_reduce"]
    many = step_time(llama, a100, data_parallel=64, **kw).terms["all_reduce"]
    net = step_time(llama, a100, data_parallel=64, network_gb_per_s=12.5, **kw).terms["all_reduce"]
    assert one == 0 and two > 0
    assert many == pytest.approx(two * (2 * 63 / 64) / (2 * 1 / 2))
    assert net > many


def test_zero3_gathers_weights_as_stored_and_over_the_network_across_nodes(llama70):
    """QLoRA + ZeRO-3 all-gathers 4-bit codes (a quarter of 16-bit bytes, the lm_head still 16-bit);
    shards on several nodes gather over the cluster network, slower than a node's own link."""
    a10g = lookup_gpu("A10G")
    kw = dict(seq_len=256, micro_batch_size=1, gradient_checkpointing="hf", backend="hf", num_shards=4)
    bf16 = step_time(llama70, a10g, quantization="bf16", **kw).terms["zero3"]
    nf4 = step_time(llama70, a10g, quantization="nf4", **kw).terms["zero3"]
    across = step_time(llama70, a10g, quantization="nf4", network_gb_per_s=12.5, **kw).terms["zero3"]
    assert 0 < nf4 < bf16 / 2.5
    assert across > nf4


def test_expected_error_is_shown():
    assert expected_error_text() == f"+-{round(100 * EXPECTED_ERROR)}%"
    assert expected_error_text(0.25) == "+-25%"


def test_plan_and_estimate_show_the_expected_error():
    """The plan table and `rayquant estimate` give tokens/s with its +- (not "up to ... a bound")."""
    from planner.hardware import parse_gpu_spec
    from planner.plan import JobSpec
    from planner.search import make_plan
    from rayquant.planning import estimate
    from rayquant.report import estimate_text, plan_table

    plan = make_plan("meta-llama/Llama-3.1-8B", parse_gpu_spec("L4"), JobSpec())
    text = plan_table(plan)
    assert f"{plan.tokens_per_second:,.0f} tokens/s ({expected_error_text()}" in text
    assert "up to" not in text.splitlines()[1]
    result = estimate("meta-llama/Llama-3.1-8B", "L4")
    assert result["tokens_per_second_error"] == EXPECTED_ERROR
    assert f"{result['tokens_per_second']:,.0f} tokens/s ({expected_error_text()})" in estimate_text(result)
