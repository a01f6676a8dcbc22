"""The `adapters`, `gradients` and `optimizer` terms: what the trainable parameters hold.

LoRA trains A/B adapters on the targeted linears; full fine-tuning trains every parameter in 16-bit.
Each trainable tensor has a gradient of its own dtype and AdamW states (torch: two tensors of the
parameter's dtype; bitsandbytes 8-bit: planner.tensor_bytes.adamw_8bit_state_bytes).
"""

from __future__ import annotations

from collections import Counter

from typing import Sequence

from planner.memory.weights import layer_groups
from planner.architecture import LinearShape, ModelSpec
from planner.tensor_bytes import BNB_QMAP_BYTES, SIXTEEN_BIT_BYTES, adamw_8bit_state_bytes, adamw_8bit_state_parts

# PEFT creates lora_A/lora_B as nn.Linear (fp32 by default), moves them to the base weight's dtype
# when it is a float (LoraLayer._move_adapter_to_device_of_base_layer), then `cast_adapter_dtype`
# (peft/tuners/tuners_utils.py, autocast_adapter_dtype=True by default, which Unsloth keeps) upcasts
# bf16/fp16 adapters back to fp32. 4-bit bases are uint8, so the adapters stay fp32 there too.
_ADAPTER_BYTES = 4
# Paged optimizers put states of tensors with >= 1e5 elements in CUDA unified memory
# (bitsandbytes/optim/optimizer.py, `if not self.is_paged or p.numel() < 1e5`): the driver evicts
# them to host RAM under pressure, so the plan counts them there.
BNB_PAGED_MIN_NUMEL = 100_000


def lora_tensors(x: LinearShape, rank: int) -> list[int]:
    """Element counts of the LoRA tensors PEFT creates for one targeted linear (A: r x in,
    B: out x r; peft/tuners/lora/layer.py LoraLayer.update_layer)."""
    return [rank * x.in_features, x.out_features * rank] * x.count


def layer_lora_tensors(linears: Sequence[LinearShape], targets: Sequence[str], rank: int) -> list[int]:
    """Element counts of one layer's LoRA tensors."""
    return [n for x in linears if x.name in targets for n in lora_tensors(x, rank)]


def layer_trainable_tensors(model: ModelSpec, linears: Sequence[LinearShape], *, targets: Sequence[str],
                            lora_rank: int, full_finetune: bool) -> list[int]:
    """Element counts of one decoder layer's trainable tensors: its LoRA adapters, or under full
    fine-tuning every linear's weight and bias, the norms, q/k norms and attention sinks."""
    if not full_finetune:
        return layer_lora_tensors(linears, targets, lora_rank)
    out: list[int] = []
    for x in linears:
        out += [x.in_features * x.out_features] * x.count
        if x.bias:
            out += [x.out_features] * x.count
    out += [model.hidden_size] * model.norms_per_layer
    out += [model.head_dim] * (2 if model.qk_norm else 0)
    if model.attention_sinks:
        out += [model.num_attention_heads]
    return out


def trainable_tensors(model: ModelSpec, *, targets: Sequence[str], lora_rank: int,
                      full_finetune: bool) -> list[int]:
    """Element counts of every trainable tensor (the 8-bit optimizer treats small tensors apart).

    LoRA: the adapters of the targeted linears. Full fine-tuning: every layer's tensors
    (layer_trainable_tensors), the embedding, the final norm and an untied lm_head.
    """
    h = model.hidden_size
    out: list[int] = []
    for linears, n_layers in layer_groups(model):
        out += layer_trainable_tensors(model, linears, targets=targets, lora_rank=lora_rank,
                                       full_finetune=full_finetune) * n_layers
    if full_finetune:
        out += [model.vocab_size * h, h] + ([] if model.tie_word_embeddings else [model.vocab_size * h])
    return out


def param_bytes(full_finetune: bool) -> int:
    """Bytes per trainable parameter: 16-bit weights under full fine-tuning, fp32 adapters."""
    return SIXTEEN_BIT_BYTES if full_finetune else _ADAPTER_BYTES


def adapter_bytes(trainable: int, full_finetune: bool) -> int:
    """The `adapters` term: fp32 LoRA A/B (none under full fine-tuning: the weights are the
    parameters, counted in `weights`)."""
    return 0 if full_finetune else _ADAPTER_BYTES * trainable


def gradient_bytes(trainable: int, full_finetune: bool) -> int:
    """The `gradients` term: one gradient per trainable parameter, in the parameter's dtype."""
    return param_bytes(full_finetune) * trainable


def optimizer_bytes(tensors: Sequence[int], optimizer: str, full_finetune: bool) -> tuple[int, int]:
    """The `optimizer` term and the paged states' host bytes: (GPU bytes, host bytes).

    torch.optim.AdamW: exp_avg and exp_avg_sq, zeros_like(param) (the param's dtype). bitsandbytes
    8-bit AdamW: the shared qmaps plus each tensor's states; paged_adamw_8bit moves the states of
    tensors of BNB_PAGED_MIN_NUMEL or more to host RAM.
    """
    if optimizer == "adamw_torch":
        return 2 * param_bytes(full_finetune) * sum(tensors), 0
    gpu, host = BNB_QMAP_BYTES, 0
    for n, count in Counter(tensors).items():  # a model repeats a few shapes many times
        states, absmax = adamw_8bit_state_parts(n)
        if optimizer == "paged_adamw_8bit" and n >= BNB_PAGED_MIN_NUMEL:
            host += count * states  # state1/state2 paged; the absmax vectors stay on the device
            gpu += count * absmax
        else:
            gpu += count * (states + absmax)
    return gpu, host


def state_bytes(tensors: Sequence[int], full_finetune: bool, optimizer: str) -> int:
    """Bytes the trainable tensors of one module bring with them on the device (their gradients,
    optimizer states, and for LoRA the adapter weights): the per-module share the layer map places
    with its module. Exact per tensor, as optimizer_bytes counts them (the shared qmaps aside)."""
    p = param_bytes(full_finetune)
    own = (0 if full_finetune else p) + p  # LoRA: the adapter and its gradient; full: the gradient
    gpu, _ = optimizer_bytes(tensors, optimizer, full_finetune)
    qmaps = 0 if optimizer == "adamw_torch" else BNB_QMAP_BYTES
    return own * sum(tensors) + gpu - qmaps
