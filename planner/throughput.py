"""Predicted training tokens/s of one worker: the time of one micro-step, term by term.

    step = max(GPU work, host time per layer x layers), GPU work = GEMMs + attention + 4-bit
           dequantization + FP8 casts + LoRA adapters + optimizer + offloaded checkpoints over the
           host link + ZeRO-3 gathers + all-reduce

Each term is a formula of the model's shapes and the GPU's catalog figures (dense TFLOPS, memory
bandwidth, host link, NVLink). Four kinds of constant are fitted, from the *fit* rows of
planner/data/throughput_points.json only, by scripts/fit_throughput.py, which writes
planner/throughput_fit.py: the achievable fraction of the dense peak per GPU class, the FP8 GEMM rate
relative to the 16-bit one and the cost of casting activations to FP8, and the fixed cost per decoder
layer of each training stack (kernel launches and Python: what makes small models slow). The *check*
rows then give the expected error (`EXPECTED_ERROR`), shown next to every prediction; docs/planner.md
has the table. A calibration file (planner.calibration) still overrides per GPU type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from planner import throughput_fit
from planner.architecture import ModelSpec
from planner.hardware import GpuSpec, fp8_path_for
from planner.tensor_bytes import nf4_bytes

# Memory-bound kernels (dequantization, copies, the weight reads of a GEMM with few rows) reach about
# 70% of the peak bandwidth (STREAM-like copies reach 70-90%). Assumption, not fitted.
BANDWIDTH_EFFICIENCY = 0.70
# Pinned host <-> GPU copies reach about 80% of the PCIe link's per-direction rate. Assumption.
LINK_EFFICIENCY = 0.80
# FlashAttention-2 reaches 50-73% of the A100's peak forward+backward (Dao 2023, abstract) where
# dense 16-bit GEMMs reach ~85% (271 of 312 TFLOPS measured, stas00/ml-engineering): attention runs at
# 0.75 of the GEMM rate. Its backward is 2.5x its forward FLOPs (5 matmuls against 2); causal
# masking halves both (flash-attn benchmarks: 4*b*s^2*heads*head_dim / 2 forward).
ATTENTION_RELATIVE_RATE = 0.75
ATTENTION_BACKWARD_FACTOR = 2.5
# Dequantizing NF4 (bitsandbytes dequantize_4bit, Unsloth fast_dequantize): read the packed 0.5 B
# and an fp32 absmax per 64 weights, write the 16-bit copy the GEMM then reads.
NF4_DEQUANT_BYTES_PER_PARAM = 0.5 + 4 / 64 + 2.0
# FP8 backward (Unsloth's FP8 linears and rayquant/fp8.py alike): the e4m3 weight is dequantized to
# 16 bits (read 1 B, write 2 B) and the input gradient is a 16-bit GEMM.
FP8_DEQUANT_BYTES_PER_PARAM = 3.0
# Between nodes, the all-reduce runs over the cluster network: 100 Gb/s Ethernet/InfiniBand assumed
# where the caller does not say (12.5 GB/s per direction).
NETWORK_GB_PER_S = 12.5
# The host cost of a stack: "unsloth" (Unsloth's patched model), "hf" (transformers + PEFT, eager),
# "compiled" (torch.compile fuses the small kernels; no host cost assumed), "torchtune-eager"
# (torchtune's eager loop: only for its published row; no worker runs it).
STACKS = ("unsloth", "hf", "compiled", "torchtune-eager")

EXPECTED_ERROR: float = throughput_fit.EXPECTED_ERROR


def stack_for(backend: str) -> str:
    """The host-cost stack of a worker backend: unsloth, else transformers + PEFT (hf)."""
    return "unsloth" if backend == "unsloth" else "hf"


def gpu_class(gpu: GpuSpec) -> str:
    """The GPU class the fitted GEMM efficiency is kept by: "sm" + compute capability."""
    return "sm%d%d" % tuple(gpu.compute_capability)


def gemm_efficiency(gpu: GpuSpec, fit: Mapping | None = None) -> float:
    """Achievable fraction of the dense 16-bit peak in training GEMMs: fitted per GPU class; the
    mean of the fitted classes for a class with no fit rows."""
    eff = (fit or _FIT)["gemm_efficiency"]
    return eff.get(gpu_class(gpu), (fit or _FIT)["gemm_efficiency_default"])


_FIT = {
    "gemm_efficiency": throughput_fit.GEMM_EFFICIENCY,
    "gemm_efficiency_default": throughput_fit.GEMM_EFFICIENCY_DEFAULT,
    "fp8_relative_eager": throughput_fit.FP8_RELATIVE_EAGER,
    "fp8_cast_bytes": throughput_fit.FP8_CAST_BYTES_PER_ELEMENT,
    "fp8_relative_compiled": throughput_fit.FP8_RELATIVE_COMPILED,
    "fixed_seconds_per_layer": throughput_fit.FIXED_SECONDS_PER_LAYER,
}


@dataclass(frozen=True)
class StepTime:
    """Seconds of one micro-step by term, and the tokens it trains."""

    tokens: int
    terms: Mapping[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return sum(self.terms.values())

    @property
    def tokens_per_second(self) -> float:
        s = self.seconds
        return self.tokens / s if s > 0 else 0.0


def _groups(model: ModelSpec):
    """(decoder layers, linears of one such layer) groups: MoE models' dense layers apart."""
    if model.is_moe:
        out = [(model.num_layers - model.num_dense_layers, model.linear_layers())]
        if model.num_dense_layers:
            out.append((model.num_dense_layers, model._dense_layer_linears()))
        return out
    return [(model.num_layers, model.linear_layers())]


def _linear_params(model: ModelSpec) -> tuple[int, int]:
    """(active decoder-linear params per token, lm_head matmul params)."""
    total = 0
    for layers, linears in _groups(model):
        total += layers * sum(x.in_features * x.out_features *
                              (model.num_experts_per_tok if x.expert else x.count) for x in linears)
    # The LM head is a matmul whether or not it is tied to the embeddings.
    return total, model.vocab_size * model.hidden_size


def flops_per_token(model: ModelSpec, *, seq_len: int, full_finetune: bool, lora_params: int,
                    gradient_checkpointing: str) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) per trained token.

    Kaplan et al. 2020 / PaLM appendix B: training costs 6N per token (2N forward, 2N activation
    gradients, 2N weight gradients), N the matmul parameters (embedding lookups excluded). LoRA skips
    the frozen weights' 2N weight gradients and adds 6 FLOPs per adapter parameter; checkpointing
    recomputes the decoder forward once (+2N_layers). Attention (causal flash attention): forward
    2*L*q*s per token, backward 2.5x that, one more forward when recomputed.
    """
    layers, head = _linear_params(model)
    n = layers + head
    q = model.num_attention_heads * model.head_dim
    attn_fwd = 2.0 * model.num_layers * q * seq_len
    linear = (6.0 * n) if full_finetune else (4.0 * n + 6.0 * lora_params)
    attention = (1.0 + ATTENTION_BACKWARD_FACTOR) * attn_fwd
    if gradient_checkpointing != "none":
        linear += 2.0 * layers
        attention += attn_fwd
    return linear, attention


def step_time(model: ModelSpec, gpu: GpuSpec, *, quantization: str, seq_len: int,
              micro_batch_size: int, lora_rank: int = 16, lora_targets="all",
              full_finetune: bool = False, gradient_checkpointing: str = "unsloth",
              backend: str = "unsloth", optimizer: str = "adamw_8bit", num_shards: int = 1,
              fp8_path: str | None = None, data_parallel: int = 1,
              network_gb_per_s: float | None = None, stack: str | None = None,
              fp8_all_gemms: bool = False, fit: Mapping | None = None) -> StepTime:
    """The seconds of one micro-step of one worker, by term.

    `stack` (default from the backend) picks the host time per layer; `fp8_all_gemms` models
    torchao's compiled float8 training (all three GEMMs in FP8, casts fused), which rayquant's
    workers do not run: it is there for published rows. `data_parallel` workers all-reduce the
    trainable gradients every micro-step (no accumulation assumed) over `network_gb_per_s` (default:
    NVLink, else the host link). `fp8_path` is accepted for the record: Unsloth's FP8 path and
    rayquant's row-wise linear do the same work (row-wise casts, FP8 forward GEMMs, 16-bit backward).
    """
    fit = fit or _FIT
    stack = stack or stack_for(backend)
    tokens = seq_len * micro_batch_size
    peak16 = gpu.tflops_16bit * 1e12
    if peak16 <= 0 or tokens <= 0:
        return StepTime(tokens, {})
    eff = gemm_efficiency(gpu, fit)
    rate16 = peak16 * eff
    bw = gpu.bandwidth_gb_per_s * 1e9
    bw_eff = bw * BANDWIDTH_EFFICIENCY
    fp8 = quantization == "fp8" and bool(gpu.fp8_tflops) and fp8_path_for(gpu.compute_capability)
    rel8 = fit["fp8_relative_compiled"] if fp8_all_gemms else fit["fp8_relative_eager"]
    rate8 = (gpu.fp8_tflops or 0.0) * 1e12 * eff * rel8
    cast = 0.0 if fp8_all_gemms else fit["fp8_cast_bytes"]
    four_bit = quantization in ("nf4", "dynamic-4bit")
    recompute = gradient_checkpointing != "none"
    fwd_passes = 2 if recompute else 1
    targets = set() if full_finetune else set(model.resolve_targets(lora_targets))

    def gemm(rows: float, k: int, n: int, wbytes: float, rate: float) -> float:
        """Roofline of one GEMM: its FLOPs at `rate`, or its bytes (weight, input, output)."""
        return max(2.0 * rows * k * n / rate, (k * n * wbytes + 2.0 * rows * (k + n)) / bw_eff)

    t = dict.fromkeys(("gemm", "attention", "dequantize", "fp8_casts", "lora", "optimizer",
                       "offload", "fixed", "all_reduce", "zero3"), 0.0)
    layer_fwd = 0.0  # one decoder layer's forward compute (what an offload copy overlaps)
    for group, (layers, linears) in enumerate(_groups(model)):
        for x in linears:
            k_in, n_out = x.in_features, x.out_features
            rows = tokens * model.num_experts_per_tok / model.num_experts if x.expert else tokens
            per = layers * x.count
            quantized = x.name not in ("gate", "shared_expert_gate")  # routers stay 16-bit
            g16 = gemm(rows, k_in, n_out, 2.0, rate16)
            if fp8 and quantized:
                fwd = gemm(rows, k_in, n_out, 1.0, rate8)
                t["fp8_casts"] += per * fwd_passes * rows * k_in * cast / bw
                bwd = fwd if fp8_all_gemms else g16
                if not fp8_all_gemms:
                    t["dequantize"] += per * k_in * n_out * FP8_DEQUANT_BYTES_PER_PARAM / bw_eff
                wgrad = fwd if fp8_all_gemms else g16
            else:
                fwd = bwd = wgrad = g16
                if four_bit and quantized:
                    t["dequantize"] += (per * (fwd_passes + 1) * k_in * n_out
                                        * NF4_DEQUANT_BYTES_PER_PARAM / bw_eff)
            t["gemm"] += per * (fwd_passes * fwd + bwd + (wgrad if full_finetune else 0.0))
            if group == 0:
                layer_fwd += x.count * fwd
            if x.name in targets:
                # A (k x r) then B (r x n): 2*r*(k+n) FLOPs per row and pass, 3x for forward and
                # backward; memory-bound at small ranks: read x, write and read x@A, read and
                # write the output (2 bytes each), twice as much in the backward.
                lora_flops = 2.0 * rows * lora_rank * (k_in + n_out) * (fwd_passes + 2)
                lora_bytes = 2.0 * rows * (k_in + 2 * n_out) * (fwd_passes + 2)
                t["lora"] += per * max(lora_flops / rate16, lora_bytes / bw_eff)
    # LM head: 16-bit, forward and input gradient (weight gradient under full fine-tuning).
    t["gemm"] += gemm(tokens, model.hidden_size, model.vocab_size, 2.0, rate16) * (
        2 + (1 if full_finetune else 0))
    # Causal flash attention per layer: forward 2*b*s^2*q.
    q = model.num_attention_heads * model.head_dim
    attn_fwd = 2.0 * micro_batch_size * seq_len * seq_len * q / (rate16 * ATTENTION_RELATIVE_RATE)
    t["attention"] = model.num_layers * attn_fwd * (fwd_passes + ATTENTION_BACKWARD_FACTOR)
    layer_fwd += attn_fwd
    # Optimizer step over the trainable parameters (memory-bound): read param and grad, write the
    # param, read and write two states. LoRA adapters are fp32; full fine-tuning keeps 16-bit.
    # 8-bit states are priced as 32-bit ones: bitsandbytes' blockwise kernels pay in dequantizing
    # and requantizing what they save in bytes (torchtune measured 8-bit AdamW no faster: 6,960
    # against 7,301 tok/s), so `optimizer` does not change the prediction.
    trainable = model.num_params if full_finetune else model.lora_params(lora_rank, lora_targets)
    pbytes = 2.0 if full_finetune else 4.0
    t["optimizer"] = trainable * 7 * pbytes / max(num_shards, 1) / bw_eff
    # Unsloth's offloaded checkpointing (unsloth_zoo/gradient_checkpointing.py): each layer's input
    # goes to pinned host RAM on a side stream that the next layer waits for (overlaps that layer's
    # forward), and comes back before its recompute on the same side stream, waited for at once
    # (serial; UNSLOTH_GC_PREFETCH is off by default).
    if gradient_checkpointing == "unsloth":
        link = gpu.host_link_gb_per_s * 1e9 * LINK_EFFICIENCY
        copy = 2.0 * tokens * model.hidden_size / link
        t["offload"] = model.num_layers * (max(0.0, copy - layer_fwd) + copy)
    link_gpu = (gpu.nvlink_gb_per_s or gpu.host_link_gb_per_s) * 1e9 * LINK_EFFICIENCY
    if num_shards > 1:
        # ZeRO-3 / FSDP: every weight is all-gathered as stored (16-bit, or 4-bit codes packed in
        # 16-bit storage for QLoRA + ZeRO-3; the lm_head stays 16-bit) for each forward and the
        # backward, gradients reduce-scattered, prefetched under the compute: only what the compute
        # does not cover counts. Shards on several nodes gather over the cluster network.
        layers_n, head_n = _linear_params(model)
        stored = nf4_bytes(1 << 20) / (1 << 20) if quantization in ("nf4", "dynamic-4bit") else 2.0
        gather = network_gb_per_s * 1e9 * LINK_EFFICIENCY if network_gb_per_s else link_gpu
        comm = ((fwd_passes + 1) * (stored * layers_n + 2.0 * head_n) + trainable * pbytes) \
            * (num_shards - 1) / num_shards / gather
        t["zero3"] = max(0.0, comm - t["gemm"] - t["attention"])
    if data_parallel > 1:
        # Ring all-reduce of the gradients (fp32 adapters, 16-bit full fine-tuning): 2(n-1)/n of
        # their bytes through each worker's link, not overlapped (conservative).
        net = network_gb_per_s * 1e9 * LINK_EFFICIENCY if network_gb_per_s else link_gpu
        t["all_reduce"] = 2.0 * (data_parallel - 1) / data_parallel * trainable * pbytes / net
    # The host's time per layer (Python, kernel launches) runs ahead of the GPU asynchronously:
    # the step takes the longer of the two; "fixed" is what the host adds beyond the GPU's work.
    host = model.num_layers * fit["fixed_seconds_per_layer"].get(stack, 0.0)
    t["fixed"] = max(0.0, host - sum(t.values()))
    return StepTime(tokens, t)


def tokens_per_second(model: ModelSpec, gpu: GpuSpec, *, quantization: str, seq_len: int,
                      micro_batch_size: int, lora_rank: int = 16, lora_targets="all",
                      full_finetune: bool = False, gradient_checkpointing: str = "unsloth",
                      num_shards: int = 1, fp8_path: str | None = None, backend: str = "unsloth",
                      optimizer: str = "adamw_8bit", data_parallel: int = 1,
                      network_gb_per_s: float | None = None) -> float:
    """Predicted tokens/s of one worker (one GPU, or one pipeline of GPUs for node-spanning), within
    about +-EXPECTED_ERROR (the median error on the check rows). See `step_time` for the terms."""
    return step_time(model, gpu, quantization=quantization, seq_len=seq_len,
                     micro_batch_size=micro_batch_size, lora_rank=lora_rank,
                     lora_targets=lora_targets, full_finetune=full_finetune,
                     gradient_checkpointing=gradient_checkpointing, backend=backend,
                     optimizer=optimizer, num_shards=num_shards, fp8_path=fp8_path,
                     data_parallel=data_parallel, network_gb_per_s=network_gb_per_s).tokens_per_second


def expected_error_text(fraction: float | None = None) -> str:
    """"+-25%": how far a prediction is expected to be off (the check-row median error)."""
    return f"+-{round(100 * (EXPECTED_ERROR if fraction is None else fraction)):.0f}%"
