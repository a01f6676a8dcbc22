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
    return per_token


def backward_working_bytes_per_token(model: ModelSpec) -> int:
    """Transient gradients while one layer runs its backward: the residual-stream gradient (h)
    and the MLP's gate/up output gradients (2I), 16-bit. Freed layer by layer."""
    return SIXTEEN_BIT_BYTES * (model.hidden_size + 2 * _mlp_width(model))


def dequant_transient_bytes(model: ModelSpec, quantization: str) -> int:
    """The 16-bit copy of the largest quantized linear that exists while its backward runs:
    bitsandbytes MatMul4Bit.backward (`F.dequantize_4bit(B, ctx.state).to(dtype).t()`), Unsloth's
    fast_lora backward (`fast_dequantize(W.t(), W_quant)`) and the FP8 paths (the weight is
    dequantized to bf16 for the input gradient) all materialize one whole weight."""
    if quantization not in ("nf4", "dynamic-4bit", "fp8"):
        return 0
    return SIXTEEN_BIT_BYTES * max(x.in_features * x.out_features for x in model.linear_layers())


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
                targets: Sequence[str], gradient_checkpointing: str, tokens: int) -> Activations:
    """What `tokens` (b x s) tokens cost the decoder under `gradient_checkpointing`."""
    per_layer_act = tokens * activation_bytes_per_token(model, backend, full_finetune, quantization, targets)
    layer_input = tokens * SIXTEEN_BIT_BYTES * model.hidden_size  # the residual stream entering a layer
    working = tokens * backward_working_bytes_per_token(model)
    offloaded = 0
    if gradient_checkpointing == "none":
        kept_per_layer, recompute = per_layer_act, working
    elif gradient_checkpointing == "hf":
        # torch.utils.checkpoint per decoder layer (HF gradient_checkpointing_enable): each layer's
        # input stays on the GPU; the backward recomputes one layer's activations at a time.
        kept_per_layer, recompute = layer_input, per_layer_act + working
    elif gradient_checkpointing == "unsloth":
        # Unsloth's offloaded checkpointing (unsloth_zoo/gradient_checkpointing.py,
        # UnslothCheckpointFunction) copies each layer input over 2 MiB to pinned host RAM
        # (counted in host_bytes) and reloads it for the recompute. The 2026-11-27 H200 run measured
        # those inputs' bytes still allocated on the GPU at the loss nonetheless: Qwen2.5-0.5B
        # (24 x 2048 x 896) and Llama-3.2-1B (16 x 2048 x 2048) differ by 46 MB in layer inputs and
        # by -48 MB in the CE buffer, and their measured transients agree to 0.6 MB (docs/planner.md).
        # So the GPU keeps them too until this is understood; the host copy is counted as well.
        kept_per_layer, recompute = layer_input, per_layer_act + working
        offloaded = model.num_layers * layer_input
    else:
        raise PlanError(f"{{gradient_checkpointing}} {gradient_checkpointing!r} is not one of "
                        f"{', '.join(CHECKPOINTING)}")
    return Activations(kept_per_layer=kept_per_layer, num_layers=model.num_layers, final=2 * layer_input,
                       backward_phase=recompute + dequant_transient_bytes(model, quantization),
                       offloaded=offloaded)
