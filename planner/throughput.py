"""Predicted training tokens/s of one worker: FLOPs per token over achievable FLOP/s, plus the
memory-bound cost of dequantizing 4-bit weights.

It ranks candidate plans; it is not a benchmark. See docs/planner.md for how far to trust it. The
CPU pseudo-device goes through the same formulas with its nominal catalog figures.
"""

from __future__ import annotations

from planner.hardware import GpuSpec, fp8_path_for
from planner.architecture import ModelSpec

# Achievable fraction of the dense tensor-core peak for 16-bit training matmuls (model FLOPs
# utilisation). Published LLM fine-tuning runs land at 35-55% MFU on A100/H100 (PaLM paper table 3:
# 46% for 540B; torchtitan Llama 3 8B on H100: ~40%); we take 0.40.
MFU_16BIT = 0.40
# FP8 matmuls: the peak doubles but scaling/casting kernels eat into it; torchao's float8 training
# on 8xH100 measured 1.10-1.25x end to end (published_measurements: torchao training.md). We let FP8
# reach 0.30 of its (2x) peak on the linear layers = 1.5x the 16-bit linear rate; attention stays
# 16-bit, so the end-to-end gain lands near the published range.
MFU_FP8 = 0.30
# GEMMs fill the GPU only with enough rows (tokens per micro-step); below that utilisation falls
# roughly linearly (one wave of 128x128 tiles on 100+ SMs needs a few thousand rows). Assumption,
# not fitted: utilisation = tokens / (tokens + TOKENS_HALF_UTILISATION).
TOKENS_HALF_UTILISATION = 512
# Dequantizing NF4 reads 0.5 B/param and writes a 2 B/param 16-bit copy that the matmul reads back
# (bitsandbytes dequantize_4bit then a 16-bit GEMM): ~4.5 B/param of memory traffic per pass, at an
# achievable 70% of peak bandwidth (STREAM-like copies reach 70-90%).
DEQUANT_TRAFFIC_BYTES_PER_PARAM = 4.5
BANDWIDTH_EFFICIENCY = 0.70


def _linear_params(model: ModelSpec) -> tuple[int, int]:
    """(active decoder-linear params per token, lm_head matmul params)."""
    total = 0
    for x in model.linear_layers():
        per = x.in_features * x.out_features
        n = model.num_experts_per_tok if x.expert else x.count
        total += per * n
    moe_layers = model.num_layers - model.num_dense_layers if model.is_moe else model.num_layers
    total *= moe_layers
    if model.is_moe and model.num_dense_layers:
        dense = sum(x.in_features * x.out_features for x in model._dense_layer_linears())
        total += dense * model.num_dense_layers
    # The LM head is a matmul whether or not it is tied to the embeddings.
    return total, model.vocab_size * model.hidden_size


def flops_per_token(model: ModelSpec, *, seq_len: int, full_finetune: bool, lora_params: int,
                    gradient_checkpointing: str) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) per trained token.

    Kaplan et al. 2020 / PaLM appendix B (nanoGPT `estimate_mfu`): training costs 6N per token
    (2N forward, 2N activation gradients, 2N weight gradients) plus 12*L*q*s for attention scores
    and values (forward 4*L*q*s, backward twice that), with N the matmul parameters (embedding
    lookups excluded). LoRA skips the frozen weights' 2N weight gradients and adds 6 FLOPs per
    adapter parameter; checkpointing recomputes the decoder forward once (+2N_layers + 4*L*q*s).
    """
    layers, head = _linear_params(model)
    n = layers + head
    q = model.num_attention_heads * model.head_dim
    attn_fwd = 4.0 * model.num_layers * q * seq_len
    linear = (6.0 * n) if full_finetune else (4.0 * n + 6.0 * lora_params)
    attention = 3.0 * attn_fwd
    if gradient_checkpointing != "none":
        linear += 2.0 * layers
        attention += attn_fwd
    return linear, attention


def tokens_per_second(model: ModelSpec, gpu: GpuSpec, *, quantization: str, seq_len: int,
                      micro_batch_size: int, lora_rank: int = 16, lora_targets="all",
                      full_finetune: bool = False, gradient_checkpointing: str = "unsloth",
                      num_shards: int = 1, fp8_path: str | None = None) -> float:
    """Predicted tokens/s of one worker (one GPU, or one pipeline of GPUs for node-spanning).

    FP8 speedup applies only with quantization="fp8" through Unsloth's FP8 path on compute
    capability >= 9.0 (not with fp8_path="rowwise", nor on 8.9 where that path is the one used);
    fp16 compute is used where the GPU has no bf16 (cc < 8.0).
    """
    lora_n = 0 if full_finetune else model.lora_params(lora_rank, lora_targets)
    linear, attention = flops_per_token(model, seq_len=seq_len, full_finetune=full_finetune,
                                        lora_params=lora_n, gradient_checkpointing=gradient_checkpointing)
    tokens = seq_len * micro_batch_size
    util = tokens / (tokens + TOKENS_HALF_UTILISATION)
    peak16 = gpu.tflops_16bit * 1e12
    if peak16 <= 0:
        return 0.0
    rate16 = peak16 * MFU_16BIT * util
    # FP8 speedup only where Unsloth's load_in_fp8 runs (cc >= 9.0). On 8.9 the plan uses our
    # row-wise FP8 linear (rayquant/fp8.py), which quantizes its activations on every call: on an
    # H200 (2026-11-27, docs/gpu-measurements.md) its _scaled_mm ran at 0.55x, 1.08x and 0.58x the
    # bf16 GEMM for 4096x4096x4096, 4096x4096x14336 and 4096x14336x4096, so it gets no speedup here.
    fp8_ok = (quantization == "fp8" and gpu.fp8_tflops and fp8_path != "rowwise"
              and fp8_path_for(gpu.compute_capability) == "unsloth")
    rate_linear = gpu.fp8_tflops * 1e12 * MFU_FP8 * util if fp8_ok else rate16
    seconds = linear / rate_linear + attention / rate16
    if quantization in ("nf4", "dynamic-4bit") and gpu.bandwidth_gb_per_s > 0:
        # Every quantized weight is dequantized once per forward, once per backward, and once more
        # per recomputed forward; the cost is per micro-step, shared by its tokens.
        passes = 2 + (1 if gradient_checkpointing != "none" else 0)
        layers, _ = _linear_params(model)
        traffic = passes * DEQUANT_TRAFFIC_BYTES_PER_PARAM * layers
        seconds += traffic / (gpu.bandwidth_gb_per_s * 1e9 * BANDWIDTH_EFFICIENCY) / tokens
    if num_shards > 1:
        # ZeRO-3 all-gathers every layer's 16-bit weights in the forward and again in the backward
        # and reduce-scatters gradients; over NVLink this mostly overlaps compute. Counted as the
        # traffic of 3 weight copies at the GPU's memory bandwidth / 10 (NVLink ~ 1/10 of HBM).
        layers, head = _linear_params(model)
        comm = 3 * 2 * (layers + head) * (num_shards - 1) / num_shards
        seconds += comm / (gpu.bandwidth_gb_per_s * 1e9 / 10) / tokens
    return 1.0 / seconds

