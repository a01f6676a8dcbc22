"""Peak memory of one training worker: one named term per component, each with its source.

`estimate_memory` models what the real stack allocates (Unsloth or plain HF + PEFT + bitsandbytes +
TRL), read from their source in site-packages; nothing here is fitted to measurements. The terms:

  weights      base weights by scheme (16-bit, NF4 with or without double quant, FP8 + row scales;
               dynamic 4-bit = NF4 + the 16-bit modules it protects); embeddings, lm_head, norms
               and biases always stay 16-bit
  adapters     LoRA A/B in fp32 (PEFT upcasts adapters, see `_ADAPTER_BYTES`)
  gradients    one gradient per trainable parameter, in the parameter's dtype
  optimizer    AdamW states (torch: two tensors of the parameter's dtype; bitsandbytes 8-bit: two
               uint8 states + fp32 absmax per 256-block, small tensors in 32-bit)
  activations  what autograd keeps for the backward, by checkpointing mode
  logits       the LM head's logits and the loss (full fp32 with `hf`, chunked with `unsloth`)
  overhead     CUDA context, cuBLAS workspace and caching-allocator slack

Sizes are bytes. "b" is the micro-batch, "s" the sequence length, "h" the hidden size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from planner.hardware import GIB, MIB, GpuSpec
from planner.architecture import LinearShape, ModelSpec
from planner.plan import DEFAULT_LORA_TARGETS, MemoryBreakdown, PlanError
from planner.tensor_bytes import (BNB_QMAP_BYTES, SIXTEEN_BIT_BYTES, adamw_8bit_state_bytes, fp8_rowwise_bytes,
                                  nf4_tensor_bytes)

# -- adapters, gradients, optimizer ----------------------------------------------------------
# PEFT creates lora_A/lora_B as nn.Linear (fp32 by default), moves them to the base weight's dtype
# when it is a float (LoraLayer._move_adapter_to_device_of_base_layer), then `cast_adapter_dtype`
# (peft/tuners/tuners_utils.py, autocast_adapter_dtype=True by default, which Unsloth keeps) upcasts
# bf16/fp16 adapters back to fp32. 4-bit bases are uint8, so the adapters stay fp32 there too.
_ADAPTER_BYTES = 4
# Paged optimizers put states of tensors with >= 1e5 elements in CUDA unified memory (same file,
# `if not self.is_paged or p.numel() < 1e5`): the driver evicts them to host RAM under pressure.
BNB_PAGED_MIN_NUMEL = 100_000

# -- overhead --------------------------------------------------------------------------------
# CUDA context of a PyTorch process with lazy module loading (CUDA 12, the default since torch 2.1):
# 300-600 MiB depending on GPU and driver; transformers' model_memory_anatomy measured 1,343 MB with
# eager loading. We take 512 MiB. It is outside torch's allocator but inside NVML's total.
CUDA_CONTEXT_BYTES = 512 * MIB
# cuBLAS(Lt) workspaces: torch allocates 32 MiB per handle/stream on Hopper (4 MiB before), plus
# the flash/SDPA and cuDNN scratch: 64 MiB together. Unlike the context, these come from torch's
# caching allocator (CublasHandlePool.cpp getNewWorkspace), so they count in max_memory_allocated.
CUDA_WORKSPACE_BYTES = 64 * MIB
# Caching-allocator slack (reserved - allocated) on the per-step transients: freed blocks stay
# cached and are only reused by requests that fit them; the loss phase (one big logits buffer) and
# the backward phase (per-layer recomputation) interleave differently sized blocks, so reserved
# holds part of both. We keep 25% of the transient peak; the H200 run saw 26-60% (docs/planner.md).
ALLOCATOR_SLACK = 0.25

# -- logits ----------------------------------------------------------------------------------
# Unsloth's CausalLM forward (unsloth/models/llama.py _CausalLM_fast_forward) never materializes the
# logits: it calls unsloth_fused_ce_loss, which (UNSLOTH_CHUNKED_CE=1 and UNSLOTH_FUSED_LINEAR=1 by
# default) runs unsloth_zoo/fused_losses/fused_linear.py `_ce_impl`: the gradient is taken in the
# forward, chunk by chunk, into ONE reused [rows, vocab] logits buffer (`_Buffers`), fp32 where an
# fp32-output GEMM exists (CUDA, cc >= 8: `_logits_mode`), else 16-bit; the hidden-state gradient
# [tokens, h] (16-bit) is kept for the backward. Rows per chunk (`fused_linear_rows`): the power of two
# at or below tokens*h/vocab, at least the power of two at or below 512*151936/vocab (>= 512), at most
# 4096, and at most 2 GiB / (vocab * bytes per logit) (`_CHUNK_GB`). On cards > 24.5 GiB with >= 4096
# labelled rows, and on every cc >= 8 card <= 24.5 GiB (`_flash_min_rows_auto`), the frozen head takes
# the tiled "flash" path instead (`_tiled_forward`): a [R, tile] fp32 buffer bounded by 256 MiB
# (`_BWD_TILE_BYTES`) plus an [R, h] fp32 accumulator, R = min(4096, labelled rows).
UNSLOTH_CE_MIN_LOGITS = 512 * 151936
UNSLOTH_CE_MAX_ROWS = 4096
UNSLOTH_CE_CHUNK_BYTES = 2 * GIB
UNSLOTH_CE_TILE_BYTES = 256 * MIB
UNSLOTH_CE_TILE_COLS = 16384
UNSLOTH_CE_SMALL_CARD_BYTES = int(24.5 * GIB)
UNSLOTH_CE_FLASH_MIN_ROWS = 4096
# transformers ForCausalLMLoss (loss/loss_utils.py) with the hf backend: lm_head writes 16-bit
# logits (2 B, kept in the model output that TRL reads), `logits.float()` + log_softmax keeps the fp32
# log-probabilities (4 B) for the backward, and the backward holds the fp32 incoming gradient (4 B)
# and the fp32 input gradient (4 B) at once: 14 bytes per logit at the peak.
HF_LOGIT_BYTES = 2 + 4 + 4 + 4
# peft prepare_model_for_kbit_training (peft/utils/other.py, "cast all non INT8 parameters to fp32"),
# which the hf backend calls for 4-bit bases, upcasts every 16-bit parameter that is not a Params4bit
# (embeddings, lm_head, norms, biases, protected 16-bit modules) to fp32.
KBIT_UPCAST_BYTES = 4

COMPUTE_BYTES = SIXTEEN_BIT_BYTES
# Architectures with LayerNorm instead of RMSNorm: torch's native layer_norm keeps its 16-bit input
# and per-row statistics, with no fp32 copy of the input.
LAYERNORM_MODEL_TYPES = ("phi", "gpt_neox", "gpt2", "falcon")


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted memory of one worker; `breakdown` sums to `peak_bytes` (on its busiest GPU)."""

    breakdown: MemoryBreakdown
    peak_bytes: int
    host_bytes: int  # host RAM one worker adds (offloaded activations, paged optimizer states)
    capacity_bytes: int  # the device's memory
    trainable_params: int
    # Bytes each module needs (static state + what it keeps for the backward), keyed by HF module
    # name (model.embed_tokens, model.layers.N, model.norm, lm_head): the layer map's input.
    module_bytes: Mapping[str, int]
    # Parts of `overhead` torch's caching allocator does not count as allocated: the CUDA context
    # (outside torch entirely) and the allocator slack (reserved but not allocated).
    context_bytes: int = 0
    slack_bytes: int = 0

    @property
    def allocated_bytes(self) -> int:
        """Predicted torch.cuda.max_memory_allocated: the peak without context and slack."""
        return self.peak_bytes - self.context_bytes - self.slack_bytes

    @property
    def reserved_bytes(self) -> int:
        """Predicted torch.cuda.max_memory_reserved: allocated plus the allocator slack."""
        return self.peak_bytes - self.context_bytes

    def fits(self, safety_margin: float = 0.0) -> bool:
        return self.peak_bytes <= budget_bytes(self.capacity_bytes, safety_margin)


def budget_bytes(capacity_bytes: int, safety_margin: float) -> int:
    """The bytes a plan may use on a device: its memory less the safety margin."""
    return int(capacity_bytes * (1.0 - safety_margin))


def _linear_weight_bytes(x: LinearShape, scheme: str, double_quant: bool) -> int:
    """One LinearShape (all `count` copies) stored by `scheme`; its bias stays 16-bit."""
    numel = x.in_features * x.out_features
    bias = COMPUTE_BYTES * x.out_features if x.bias else 0
    if scheme in ("nf4", "dynamic-4bit"):
        per = nf4_tensor_bytes(numel, double_quant)
    elif scheme == "fp8":
        per = fp8_rowwise_bytes(x.in_features, x.out_features)
    else:
        per = COMPUTE_BYTES * numel
    return x.count * (per + bias)


def _lora_tensors(x: LinearShape, rank: int) -> list[int]:
    """Element counts of the LoRA tensors PEFT creates for one targeted linear (A: r x in, B: out x r)."""
    return [rank * x.in_features, x.out_features * rank] * x.count


# -- activations ----------------------------------------------------------------------------------
def activation_bytes_per_token(model: ModelSpec, backend: str, full_finetune: bool,
                               quantization: str = "bf16", targets: Sequence[str] = ()) -> int:
    """Bytes one decoder layer keeps per token for its backward, without recomputation.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", sec. 4.1)
    count 34*s*b*h for a GPT layer; redone here for SwiGLU + GQA + flash/SDPA attention (no s^2
    score matrix: flash keeps only its output and a per-head logsumexp) and no dropout, 16-bit:
      always:    q after RoPE (q), k and v (kv each), the attention output (q, kept by SDPA); the
                 MLP's gate and up outputs and silu(gate) (I each; non-gated: fc1 output I)
      inputs of the linears, only where their backward needs them: autograd keeps a linear's input
      only when its weight gets a gradient (full fine-tuning or a LoRA adapter on it; a frozen
      F.linear saves just its weight), but bitsandbytes' MatMul4Bit and FP8 linears are custom
      autograd functions that always keep it (`ctx.tensors = (A, B)`): normed input of q/k/v (h),
      o_proj input (q), normed input of gate/up (h), down_proj input (I)
      norms:     LlamaRMSNorm upcasts its input to fp32 and keeps that copy (4 B x h, two norms);
                 LayerNorm architectures keep the 16-bit input (2 B x h)
    Unsloth's kernels (backend "unsloth", LoRA) keep, per its fast_lora.py / fast_rms_layernorm: X for
    LoRA_QKV and LoRA_W, X/gate/up for LoRA_MLP (recomputing silu and the product), the 16-bit
    norm inputs: 2h + 3q + 2kv + 2h + 2I. MoE: a token passes num_experts_per_tok experts (+ shared).
    """
    h = model.hidden_size
    q = model.num_attention_heads * model.head_dim
    kv = model.num_key_value_heads * model.head_dim
    if model.is_moe:
        width = model.num_experts_per_tok * model.moe_intermediate_size + \
            model.shared_expert_intermediate_size
    else:
        width = model.intermediate_size
    if backend == "unsloth" and not full_finetune:
        return COMPUTE_BYTES * (2 * h + 3 * q + 2 * kv + 2 * h + 2 * width)
    names = set(targets)

    def kept(*group: str) -> bool:
        return full_finetune or quantization in ("nf4", "dynamic-4bit", "fp8") or bool(names & set(group))

    elements = 2 * q + 2 * kv + (3 * width if model.gated_mlp else width)
    elements += h if kept("q_proj", "k_proj", "v_proj", "qkv_proj") else 0
    elements += q if kept("o_proj") else 0
    elements += h if kept("gate_proj", "up_proj", "gate_up_proj") else 0
    elements += width if kept("down_proj") else 0
    per_token = COMPUTE_BYTES * elements
    if model.model_type in LAYERNORM_MODEL_TYPES:
        per_token += 2 * COMPUTE_BYTES * h
    else:
        per_token += 2 * 4 * h
    return per_token


def backward_working_bytes_per_token(model: ModelSpec) -> int:
    """Transient gradients while one layer runs its backward: the residual-stream gradient (h)
    and the MLP's gate/up output gradients (2I), 16-bit. Freed layer by layer."""
    width = (model.num_experts_per_tok * model.moe_intermediate_size
             + model.shared_expert_intermediate_size) if model.is_moe else model.intermediate_size
    return COMPUTE_BYTES * (model.hidden_size + 2 * width)



def unsloth_ce_bytes(model: ModelSpec, gpu: GpuSpec, tokens: int, labelled: int) -> int:
    """Peak bytes of Unsloth's fused linear cross entropy (see the constants above for the source):
    the reused logits buffer, its row statistics, and the [tokens, h] 16-bit hidden-state gradient
    it keeps for the backward. `labelled` is the number of rows with a target (tokens - b)."""
    h, vocab = model.hidden_size, model.vocab_size
    cuda_fp32 = not gpu.is_cpu and tuple(gpu.compute_capability) >= (8, 0)
    per_logit = 4 if cuda_fp32 else COMPUTE_BYTES
    grad_hidden = COMPUTE_BYTES * tokens * h
    if labelled <= 0:  # one-token sequences: no next token to predict, no logits
        return grad_hidden
    stats = 3 * 4 * labelled  # log-probs, lse, divisor bookkeeping: fp32 per labelled row
    small_card = gpu.memory_bytes <= UNSLOTH_CE_SMALL_CARD_BYTES
    flash_min_rows = 0 if small_card else UNSLOTH_CE_FLASH_MIN_ROWS
    if cuda_fp32 and labelled >= flash_min_rows:
        rows = min(UNSLOTH_CE_MAX_ROWS, labelled, UNSLOTH_CE_TILE_BYTES // (UNSLOTH_CE_TILE_COLS * 4))
        tile = max(UNSLOTH_CE_TILE_BYTES // (rows * 4), UNSLOTH_CE_TILE_COLS)
        if small_card:
            tile = min(tile, UNSLOTH_CE_TILE_COLS)
        tile = min(tile - tile % UNSLOTH_CE_TILE_COLS, math.ceil(vocab / UNSLOTH_CE_TILE_COLS) * UNSLOTH_CE_TILE_COLS)
        return grad_hidden + stats + rows * tile * 4 + rows * h * 4
    exact = labelled * h / vocab
    rows = 1 << max(math.ceil(math.log2(max(exact, 1))), 0)
    if rows > exact:
        rows //= 2
    min_exact = UNSLOTH_CE_MIN_LOGITS / vocab
    min_rows = 1 << max(math.ceil(math.log2(max(min_exact, 1))), 0)
    if min_rows > min_exact:
        min_rows //= 2
    min_rows = min(max(min_rows, 512), UNSLOTH_CE_MAX_ROWS)
    rows = min(max(rows, min_rows), UNSLOTH_CE_MAX_ROWS)
    rows = min(rows, max(UNSLOTH_CE_CHUNK_BYTES // (vocab * per_logit), 2), max(labelled, 1))
    padded_vocab = math.ceil(vocab / 8) * 8  # `_Buffers` pads rows to a multiple of 8 for cuBLAS
    # The per-chunk hidden-gradient product dz @ W is an fp32 [rows, h] temporary (`_dz_w`).
    return grad_hidden + stats + rows * padded_vocab * per_logit + rows * h * 4


def dequant_transient_bytes(model: ModelSpec, quantization: str) -> int:
    """The 16-bit copy of the largest quantized linear that exists while its backward runs:
    bitsandbytes MatMul4Bit.backward (`F.dequantize_4bit(B, ctx.state).to(dtype).t()`), Unsloth's
    fast_lora backward (`fast_dequantize(W.t(), W_quant)`) and the FP8 paths (the weight is
    dequantized to bf16 for the input gradient) all materialize one whole weight."""
    if quantization not in ("nf4", "dynamic-4bit", "fp8"):
        return 0
    return COMPUTE_BYTES * max(x.in_features * x.out_features for x in model.linear_layers())

# -- the estimate ---------------------------------------------------------------------------------
def _layers(model: ModelSpec) -> list[tuple[tuple[LinearShape, ...], int]]:
    """(linears of one layer, number of such layers): MoE models may keep some dense layers."""
    if not model.is_moe:
        return [(model.linear_layers(), model.num_layers)]
    out = [(model.linear_layers(), model.num_layers - model.num_dense_layers)]
    if model.num_dense_layers:
        out.append((model._dense_layer_linears(), model.num_dense_layers))
    return out


def _layer_norm_params(model: ModelSpec) -> int:
    return (model.norms_per_layer * model.hidden_size + (2 * model.head_dim if model.qk_norm else 0)
            + (model.num_attention_heads if model.attention_sinks else 0))


def estimate_memory(
    model: ModelSpec,
    gpu: GpuSpec,
    *,
    quantization: str = "dynamic-4bit",
    double_quant: bool = True,
    backend: str = "unsloth",
    seq_len: int = 2048,
    micro_batch_size: int = 1,
    lora_rank: int = 16,
    lora_targets: Sequence[str] | str = DEFAULT_LORA_TARGETS,
    full_finetune: bool = False,
    gradient_checkpointing: str = "unsloth",
    optimizer: str = "adamw_8bit",
    num_shards: int = 1,
    protected_bytes: int = 0,
) -> MemoryEstimate:
    """Peak memory of one worker for one fixed configuration.

    `num_shards` > 1 models ZeRO-3: weights, gradients and optimizer states are split over that many
    GPUs, plus one layer's gathered 16-bit weights (DeepSpeed all-gathers a layer before using it).
    `protected_bytes` is what dynamic 4-bit spends keeping sensitive modules in 16-bit.
    """
    if seq_len < 1 or micro_batch_size < 1:
        raise PlanError(f"seq_len and micro_batch_size must be >= 1, got {seq_len} and {micro_batch_size}")
    if full_finetune and quantization not in ("bf16", "fp16"):
        raise PlanError(f"full fine-tuning needs 16-bit weights, not {quantization}. To fix: use "
                        "--quantization bf16 (or fp16), or drop --full-finetune to train LoRA adapters.")
    if num_shards < 1:
        raise PlanError(f"num_shards must be >= 1, got {num_shards}")
    targets = () if full_finetune else model.resolve_targets(
        lora_targets if isinstance(lora_targets, str) else tuple(lora_targets))
    h, b, s = model.hidden_size, micro_batch_size, seq_len
    tokens = b * s

    # Weights: decoder linears by scheme; the router stays 16-bit under dynamic 4-bit and FP8
    # (Unsloth's dynamic quants skip it; FP8 paths only convert the projection linears).
    weights_layers = []
    trainable_tensors: list[int] = []  # element counts, for the 8-bit optimizer's small-tensor rule
    adapter_layers = []
    sixteen_bit = 0  # bytes of the 16-bit parameters beside the quantized linears (kbit upcast)
    for linears, n_layers in _layers(model):
        w = 0
        lora = []
        for x in linears:
            scheme = quantization
            if x.name in ("gate", "shared_expert_gate") and quantization != "nf4":
                scheme = "bf16"
            w += _linear_weight_bytes(x, scheme, double_quant)
            if scheme in ("nf4", "dynamic-4bit"):
                sixteen_bit += n_layers * x.count * (COMPUTE_BYTES * x.out_features if x.bias else 0)
            else:
                sixteen_bit += n_layers * _linear_weight_bytes(x, scheme, double_quant)
            if x.name in targets:
                lora += _lora_tensors(x, lora_rank)
        w += COMPUTE_BYTES * _layer_norm_params(model)
        sixteen_bit += n_layers * COMPUTE_BYTES * _layer_norm_params(model)
        weights_layers.append((w, n_layers))
        adapter_layers.append((lora, n_layers))
        if full_finetune:
            for x in linears:
                trainable_tensors += [x.in_features * x.out_features] * (x.count * n_layers)
                if x.bias:
                    trainable_tensors += [x.out_features] * (x.count * n_layers)
            trainable_tensors += [h] * (model.norms_per_layer * n_layers)
            trainable_tensors += [model.head_dim] * ((2 if model.qk_norm else 0) * n_layers)
            if model.attention_sinks:
                trainable_tensors += [model.num_attention_heads] * n_layers
        else:
            trainable_tensors += lora * n_layers
    embed_params = model.vocab_size * h
    head_params = 0 if model.tie_word_embeddings else model.vocab_size * h
    if full_finetune:
        trainable_tensors += [embed_params, h] + ([head_params] if head_params else [])
    embed_w = COMPUTE_BYTES * embed_params
    head_w = COMPUTE_BYTES * (head_params + h)  # lm_head + final norm
    layer_w = [w for w, _ in weights_layers]
    weights = embed_w + head_w + sum(w * n for w, n in weights_layers)
    if quantization == "dynamic-4bit":
        weights += protected_bytes
    if backend == "hf" and quantization in ("nf4", "dynamic-4bit"):
        # prepare_model_for_kbit_training upcasts the 16-bit parameters to fp32 (KBIT_UPCAST_BYTES).
        upcast = sixteen_bit + embed_w + head_w + (protected_bytes if quantization == "dynamic-4bit" else 0)
        weights += upcast * (KBIT_UPCAST_BYTES - COMPUTE_BYTES) // COMPUTE_BYTES

    # Adapters, gradients and optimizer states of the trainable parameters.
    param_bytes = COMPUTE_BYTES if full_finetune else _ADAPTER_BYTES
    trainable = sum(trainable_tensors)
    adapters = 0 if full_finetune else _ADAPTER_BYTES * trainable
    gradients = param_bytes * trainable
    paged_host = 0
    if optimizer == "adamw_torch":
        # torch.optim.AdamW: exp_avg and exp_avg_sq, zeros_like(param) (the param's dtype).
        opt = 2 * param_bytes * trainable
    else:
        opt = BNB_QMAP_BYTES
        for n in trainable_tensors:
            states = adamw_8bit_state_bytes(n)
            if optimizer == "paged_adamw_8bit" and n >= BNB_PAGED_MIN_NUMEL:
                paged_host += states
            else:
                opt += states

    # ZeRO-3 splits the persistent state and gathers one layer's 16-bit weights at a time.
    if num_shards > 1:
        gathered = max(layer_w)
        weights = math.ceil(weights / num_shards) + gathered
        adapters = math.ceil(adapters / num_shards)
        gradients = math.ceil(gradients / num_shards)
        opt = math.ceil(opt / num_shards)
        paged_host = math.ceil(paged_host / num_shards)

    # Activations by checkpointing mode. The step has two transient phases that never overlap: the
    # loss (logits and their gradient, freed before the decoder backward starts) and the decoder
    # backward (one layer's recomputed activations, its gradients and a dequantized weight). What
    # each layer keeps from the forward is alive in both; the peak takes the larger phase.
    per_layer_act = tokens * activation_bytes_per_token(model, backend, full_finetune,
                                                         quantization, targets)
    layer_input = tokens * COMPUTE_BYTES * h  # the residual stream entering a layer
    working = tokens * backward_working_bytes_per_token(model)
    dequant = dequant_transient_bytes(model, quantization)
    L = model.num_layers
    offloaded = 0
    if gradient_checkpointing == "none":
        kept_per_layer = per_layer_act
        recompute = working
    elif gradient_checkpointing == "hf":
        # torch.utils.checkpoint per decoder layer (HF gradient_checkpointing_enable): each layer's
        # input stays on the GPU; the backward recomputes one layer's activations at a time.
        kept_per_layer = layer_input
        recompute = per_layer_act + working
    elif gradient_checkpointing == "unsloth":
        # Unsloth's offloaded checkpointing (unsloth_zoo/gradient_checkpointing.py,
        # UnslothCheckpointFunction) copies each layer input over 2 MiB to pinned host RAM
        # (counted in host_bytes) and reloads it for the recompute. The 2026-11-27 H200 run measured
        # those inputs' bytes still allocated on the GPU at the loss nonetheless: Qwen2.5-0.5B
        # (24 x 2048 x 896) and Llama-3.2-1B (16 x 2048 x 2048) differ by 46 MB in layer inputs and
        # by -48 MB in the CE buffer, and their measured transients agree to 0.6 MB (docs/planner.md).
        # So the GPU keeps them too until this is understood; the host copy is counted as well.
        kept_per_layer = layer_input
        recompute = per_layer_act + working
        offloaded = L * layer_input
    else:
        raise PlanError(f"gradient_checkpointing={gradient_checkpointing!r} is not one of none, hf, unsloth")
    kept = L * kept_per_layer
    # The embedding output (the first layer's input) and the final norm's input stay either way.
    final = 2 * layer_input

    # Logits and loss.
    n_logits = tokens * model.vocab_size
    if backend == "unsloth":
        logits = unsloth_ce_bytes(model, gpu, tokens, tokens - b)
        if full_finetune:
            # A trainable head gets its gradient accumulated over the chunks (`acc_w`, head dtype).
            logits += COMPUTE_BYTES * model.vocab_size * h
    else:
        logits = HF_LOGIT_BYTES * n_logits
    backward_extra = recompute + dequant
    activations = kept + final + max(0, backward_extra - logits)

    # Overhead: context and workspaces (GPU only), allocator slack on the per-step allocations.
    # Only the workspaces are inside torch's allocator; context and slack are not "allocated".
    context = 0 if gpu.is_cpu else CUDA_CONTEXT_BYTES
    workspace = 0 if gpu.is_cpu else CUDA_WORKSPACE_BYTES
    slack = int(ALLOCATOR_SLACK * (activations + logits))
    overhead = context + workspace + slack

    breakdown = MemoryBreakdown(weights=int(weights), adapters=int(adapters), gradients=int(gradients),
                                optimizer=int(opt), activations=int(activations), logits=int(logits),
                                overhead=int(overhead))
    # Per-module bytes for the layer map (no sharding: the map is only used without ZeRO-3):
    # each module's weights, the state of its trainable parameters and what it keeps for backward.
    if full_finetune:
        state_per_param = param_bytes + (2 * param_bytes if optimizer == "adamw_torch" else 2)
    else:
        state_per_param = 2 * _ADAPTER_BYTES + (8 if optimizer == "adamw_torch" else 2)
    module_bytes: dict[str, int] = {
        "model.embed_tokens": embed_w + (state_per_param * embed_params if full_finetune else 0)}
    index = 0
    for (linears, n_layers), w, (lora, _) in zip(_layers(model), layer_w, adapter_layers):
        layer_train = (sum(x.params for x in linears) + _layer_norm_params(model)) \
            if full_finetune else sum(lora)
        per = int(w + state_per_param * layer_train + kept_per_layer)
        for _ in range(n_layers):
            module_bytes[f"model.layers.{index}"] = per
            index += 1
    module_bytes["model.norm"] = COMPUTE_BYTES * h
    module_bytes["model.rotary_emb"] = 0
    module_bytes["lm_head"] = int(COMPUTE_BYTES * head_params + logits
                                  + (state_per_param * head_params if full_finetune else 0))

    return MemoryEstimate(
        breakdown=breakdown,
        peak_bytes=breakdown.total,
        host_bytes=int(offloaded + paged_host),
        capacity_bytes=int(gpu.memory_bytes),
        trainable_params=int(trainable),
        module_bytes=module_bytes,
        context_bytes=int(context),
        slack_bytes=int(slack),
    )


def max_seq_len(model: ModelSpec, gpu: GpuSpec, *, safety_margin: float = 0.0,
                upper: int | None = None, **config) -> int:
    """The longest sequence that fits `gpu` for this configuration (binary search); 0 if none.

    `config` takes estimate_memory's keyword arguments except seq_len. Peak memory grows with the
    sequence length, so the search is exact for this model.
    """
    config.pop("seq_len", None)
    limit = budget_bytes(gpu.memory_bytes, safety_margin)

    def fits(s: int) -> bool:
        return estimate_memory(model, gpu, seq_len=s, **config).peak_bytes <= limit

    hi = upper or max(model.max_position_embeddings, 1 << 17)
    if not fits(1):
        return 0
    if fits(hi):
        return hi
    lo = 1  # fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
