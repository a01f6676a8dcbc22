"""The `activations` term: what autograd keeps for the backward, by checkpointing mode.

The step has two transient phases that never overlap: the loss (logits and their gradient, freed
before the decoder backward starts; planner.memory.logits) and the decoder backward (one layer's
recomputed activations, its gradients and a dequantized weight). What each layer keeps from the
forward is alive in both; the peak takes the larger phase, so the term is what the layers keep plus
whatever the backward phase needs beyond the loss phase.

"b" is the micro-batch, "s" the sequence length, "h" the hidden size; sizes are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from planner.architecture import ModelSpec
from planner.plan import PlanError
from planner.tensor_bytes import SIXTEEN_BIT_BYTES
from planner.vocab import CHECKPOINTING

# Architectures with LayerNorm instead of RMSNorm: torch's native layer_norm keeps its 16-bit input
# and per-row statistics, with no fp32 copy of the input.
LAYERNORM_MODEL_TYPES = ("phi", "gpt_neox", "gpt2", "falcon")


def _mlp_width(model: ModelSpec) -> int:
    """The MLP width a token passes: num_experts_per_tok experts (+ the shared one) for MoE."""
    if model.is_moe:
        return model.num_experts_per_tok * model.moe_intermediate_size + model.shared_expert_intermediate_size
    return model.intermediate_size


def activation_bytes_per_token(model: ModelSpec, backend: str, full_finetune: bool,
                               quantization: str = "bf16", targets: Sequence[str] = (),
                               kbit_upcast: bool = False) -> int:
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
    width = _mlp_width(model)
    if backend == "unsloth" and not full_finetune:
        return SIXTEEN_BIT_BYTES * (2 * h + 3 * q + 2 * kv + 2 * h + 2 * width)
    names = set(targets)

    def kept(*group: str) -> bool:
        return full_finetune or quantization in ("nf4", "dynamic-4bit", "fp8") or bool(names & set(group))

    elements = 2 * q + 2 * kv + (3 * width if model.gated_mlp else width)
    elements += h if kept("q_proj", "k_proj", "v_proj", "qkv_proj") else 0
    elements += q if kept("o_proj") else 0
    elements += h if kept("gate_proj", "up_proj", "gate_up_proj") else 0
    elements += width if kept("down_proj") else 0
    per_token = SIXTEEN_BIT_BYTES * elements
    if model.model_type in LAYERNORM_MODEL_TYPES:
        per_token += 2 * SIXTEEN_BIT_BYTES * h
    else:
        per_token += 2 * 4 * h
    if kbit_upcast:
        per_token += kbit_fp32_extra_bytes_per_token(model)
    return per_token


def kbit_fp32_extra_bytes_per_token(model: ModelSpec) -> int:
    """What the hf backend's fp32 norms add per token and layer on a 4-bit base.

    peft prepare_model_for_kbit_training upcasts the norms' weights to fp32, so each norm's output
    (`self.weight * hidden_states.to(input_dtype)`, LlamaRMSNorm) is fp32: 2 norms x h x 2 B more than
    16-bit. bitsandbytes' Linear4bit.forward casts its input to the compute dtype and its output
    back to the input's dtype (`out.to(inp_dtype)`), so the projections fed by a norm (q, k, v; gate,
    up) also come out fp32: (q + 2kv + 2I) x 2 B more, kept for the attention and the MLP backward.
    """
    q = model.num_attention_heads * model.head_dim
    kv = model.num_key_value_heads * model.head_dim
    gate_up = 2 * _mlp_width(model) if model.gated_mlp else _mlp_width(model)
    return (4 - SIXTEEN_BIT_BYTES) * (2 * model.hidden_size + q + 2 * kv + gate_up)


def backward_working_bytes_per_token(model: ModelSpec) -> int:
    """Transient gradients while one layer runs its backward: the residual-stream gradient (h)
    and the MLP's gate/up output gradients (2I), 16-bit. Freed layer by layer."""
    return SIXTEEN_BIT_BYTES * (model.hidden_size + 2 * _mlp_width(model))


def unsloth_dequant_scratch_bytes(model: ModelSpec, quantization: str, backend: str) -> int:
    """Unsloth's persistent dequantization scratch: its `matmul_lora` (kernels/utils.py,
    `use_global_buffer = True` by default) dequantizes each 4-bit weight into one buffer kept per
    device (`_scratch("weight", ...)`, grown to the largest weight and never freed), so a 16-bit
    copy of the largest 4-bit linear stays allocated from the first forward on, beside the
    backward's own transient (`fast_dequantize` of up/gate in LoRA_MLP.backward). Without double
    quantization bitsandbytes dequantizes into a fresh tensor instead; counted anyway (safe side)."""
    if backend != "unsloth" or quantization not in ("nf4", "dynamic-4bit"):
        return 0
    return SIXTEEN_BIT_BYTES * max(x.in_features * x.out_features for x in model.linear_layers())


def dequant_transient_bytes(model: ModelSpec, quantization: str) -> int:
    """The 16-bit copy of the largest quantized linear that exists while its backward runs:
    bitsandbytes MatMul4Bit.backward (`F.dequantize_4bit(B, ctx.state).to(dtype).t()`), Unsloth's
    fast_lora backward (`fast_dequantize(W.t(), W_quant)`) and the FP8 paths (the weight is
    dequantized to bf16 for the input gradient) all materialize one whole weight."""
    if quantization not in ("nf4", "dynamic-4bit", "fp8"):
        return 0
    return SIXTEEN_BIT_BYTES * max(x.in_features * x.out_features for x in model.linear_layers())


# Unsloth's offloaded checkpointing, unsloth_zoo/gradient_checkpointing.py (the installed version):
# `UnslothCheckpointFunction.forward` copies a checkpointed layer's first input (the residual stream,
# b x s x h, 16-bit) to a pinned host slot when it is over MINIMUM_SIZE = 2 MiB (`new_size >
# MINIMUM_SIZE`) and keeps no GPU reference to it (`tensor_inputs.append(None)`); from the second
# step on the last layer (`LAST_GC_INDEX`) is not offloaded and stays on the GPU. The backward reloads
# each input into a GPU staging buffer (`GPU_BUFFERS`, resized to the input) and, with double
# buffering (on after the first step when more than DOUBLE_BUFFER_HEADROOM = 512 MiB is free), a
# second one (`GPU_BUFFERS_B`), and recomputes the layer with the staging buffer as its input.
UNSLOTH_OFFLOAD_MIN_BYTES = 2 * 1024 * 1024
UNSLOTH_GPU_STAGING_BUFFERS = 2
# Host side: INITIAL_CPU_BUFFER_COUNT = 200 pinned slots of INITIAL_CPU_BUFFER_SIZE = 128 Ki
# 16-bit elements are made up front; a slot that holds a bigger input is regrown (`_grow_host_buffer`,
# a new pinned block; the old one stays in torch's pinned cache). torch's CachingHostAllocator rounds
# each pinned block up to a power of two (`_pinned_block_bytes`). One slot per offloaded layer (slots
# are leased from a checkpoint's forward until its backward).
UNSLOTH_INITIAL_HOST_SLOTS = 200
UNSLOTH_INITIAL_HOST_SLOT_BYTES = 128 * 1024 * SIXTEEN_BIT_BYTES


def _pinned_block_bytes(nbytes: int) -> int:
    """torch's pinned host allocator block for `nbytes`: the next power of two."""
    return 0 if nbytes <= 0 else 1 << (int(nbytes) - 1).bit_length()


def unsloth_offload_host_bytes(layer_input: int, num_layers: int) -> int:
    """Host RAM Unsloth's offloaded checkpointing pins: the 200 initial slots, plus for each layer
    whose input is offloaded (all of them in the first step) a power-of-two block of its size."""
    initial = UNSLOTH_INITIAL_HOST_SLOTS * UNSLOTH_INITIAL_HOST_SLOT_BYTES
    if layer_input <= UNSLOTH_OFFLOAD_MIN_BYTES:
        return initial
    return initial + num_layers * _pinned_block_bytes(layer_input)


@dataclass(frozen=True)
class Activations:
    """What the decoder holds for its backward under one checkpointing mode, bytes."""

    kept_per_layer: int  # each layer keeps from its forward until its backward
    num_layers: int
    final: int  # the embedding output (first layer's input) and the final norm's input
    backward_phase: int  # transients of one layer's backward: recompute, working set, dequantized weight
    offloaded: int  # in host RAM (Unsloth's offloaded checkpointing), not on the GPU

    def gpu_bytes(self, logits: int) -> int:
        """The `activations` term: the layers' kept bytes, plus what the backward phase needs
        beyond the loss phase's `logits` (the phases never overlap)."""
        return self.num_layers * self.kept_per_layer + self.final + max(0, self.backward_phase - logits)


def activations(model: ModelSpec, *, quantization: str, backend: str, full_finetune: bool,
                targets: Sequence[str], gradient_checkpointing: str, tokens: int,
                kbit_upcast: bool = False) -> Activations:
    """What `tokens` (b x s) tokens cost the decoder under `gradient_checkpointing`; `kbit_upcast`:
    the fp32 norms, embedding and projections of prepare_model_for_kbit_training (hf + 4-bit)."""
    per_layer_act = tokens * activation_bytes_per_token(model, backend, full_finetune, quantization, targets,
                                                        kbit_upcast)
    # The residual stream entering a layer: 16-bit, except with the hf backend on a 4-bit base, where
    # prepare_model_for_kbit_training upcasts the input embedding to fp32, so the embedding output and
    # every residual sum after it are fp32 (4 B x h per token).
    layer_input = tokens * (4 if kbit_upcast else SIXTEEN_BIT_BYTES) * model.hidden_size
    working = tokens * backward_working_bytes_per_token(model)
    offloaded = 0
    if gradient_checkpointing == "none":
        kept_per_layer, recompute = per_layer_act, working
    elif gradient_checkpointing == "hf":
        # torch.utils.checkpoint per decoder layer (HF gradient_checkpointing_enable): each layer's
        # input stays on the GPU; the backward recomputes one layer's activations at a time.
        kept_per_layer, recompute = layer_input, per_layer_act + working
    elif gradient_checkpointing == "unsloth":
        # Unsloth's offloaded checkpointing (see UNSLOTH_OFFLOAD_MIN_BYTES): inputs over 2 MiB go to
        # pinned host RAM; the GPU keeps the last layer's input and the staging buffers the backward
        # reloads into (the recompute reads its input from them, so nothing more for it). Smaller
        # inputs stay on the GPU like torch's checkpointing.
        recompute = per_layer_act + working
        offloaded = unsloth_offload_host_bytes(layer_input, model.num_layers)
        if layer_input > UNSLOTH_OFFLOAD_MIN_BYTES:
            kept_per_layer = 0
            final = (layer_input + (1 + UNSLOTH_GPU_STAGING_BUFFERS) * layer_input
                     + unsloth_dequant_scratch_bytes(model, quantization, backend))
            return Activations(kept_per_layer=0, num_layers=model.num_layers, final=final,
                               backward_phase=recompute + dequant_transient_bytes(model, quantization),
                               offloaded=offloaded)
        kept_per_layer = layer_input
    else:
        raise PlanError(f"{{gradient_checkpointing}} {gradient_checkpointing!r} is not one of "
                        f"{', '.join(CHECKPOINTING)}")
    return Activations(kept_per_layer=kept_per_layer, num_layers=model.num_layers,
                       final=2 * layer_input + unsloth_dequant_scratch_bytes(model, quantization, backend),
                       backward_phase=recompute + dequant_transient_bytes(model, quantization),
                       offloaded=offloaded)
