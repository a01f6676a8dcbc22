"""Peak memory of one training worker: `estimate_memory` composes one function per term.

  weights      planner.memory.weights.weight_bytes
  adapters     planner.memory.trainable.adapter_bytes
  gradients    planner.memory.trainable.gradient_bytes
  optimizer    planner.memory.trainable.optimizer_bytes
  activations  planner.memory.activations.activations(...).gpu_bytes
  logits       planner.memory.logits.logit_bytes
  overhead     planner.memory.overhead: context_bytes + workspace_bytes + slack_bytes
  host RAM     host_bytes below (offloaded activations, paged optimizer states); under ZeRO-3 at
               least a 4-bit base loaded whole (weights.zero3_load_host_bytes)

Each models what the real stack allocates (Unsloth or plain HF + PEFT + bitsandbytes + TRL), read
from their source in site-packages; one constant is fitted (overhead.ALLOCATOR_SLACK, from the fit rows
of tests/data/validation.json by scripts/fit_constants.py). Sizes are bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from planner.hardware import GpuSpec
from planner.memory.activations import Activations, activations
from planner.memory.logits import logit_bytes
from planner.memory.protected import Protection, planned_protection
from planner.memory.overhead import context_bytes, slack_bytes, workspace_bytes
from planner.memory.trainable import (adapter_bytes, gradient_bytes, layer_trainable_tensors, optimizer_bytes,
                                      state_bytes, trainable_tensors)
from planner.memory.weights import (embedding_bytes, kbit_prepared, layer_groups, layer_weight_bytes,
                                    weight_bytes, zero3_load_host_bytes, zero3_weight_bytes)
from planner.architecture import ModelSpec
from planner.plan import MemoryBreakdown, PlanError
from planner.tensor_bytes import sixteen_bit_bytes
from planner.vocab import DEFAULT_LORA_RANK, DEFAULT_LORA_TARGETS


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


def budget_bytes(capacity_bytes: int, safety_margin: float) -> int:
    """The bytes a plan may use on a device: its memory less the safety margin."""
    return int(capacity_bytes * (1.0 - safety_margin))


def host_bytes(decoder: Activations, paged_optimizer_bytes: int) -> int:
    """Host RAM one worker adds: layer inputs Unsloth's checkpointing offloads (`offloaded`) and
    the paged optimizer's states (planner.memory.trainable.optimizer_bytes)."""
    return decoder.offloaded + paged_optimizer_bytes


def _module_bytes(model: ModelSpec, *, quantization: str, double_quant: bool, targets: Sequence[str],
                  lora_rank: int, full_finetune: bool, optimizer: str, kept_per_layer: int,
                  logits: int) -> dict[str, int]:
    """Per-module bytes for the layer map (no sharding: the map is only used without ZeRO-3):
    each module's weights, the state of its trainable parameters and what it keeps for backward;
    lm_head carries the loss's logits."""
    def state(tensors: list[int]) -> int:
        return state_bytes(tensors, full_finetune, optimizer)

    embed_params = model.vocab_size * model.hidden_size
    head_params = 0 if model.tie_word_embeddings else embed_params
    out = {"model.embed_tokens": embedding_bytes(model) + (state([embed_params]) if full_finetune else 0)}
    index = 0
    for linears, n_layers in layer_groups(model):
        trained = layer_trainable_tensors(model, linears, targets=targets, lora_rank=lora_rank,
                                          full_finetune=full_finetune)
        per = int(layer_weight_bytes(model, linears, quantization, double_quant) + state(trained)
                  + kept_per_layer)
        for _ in range(n_layers):
            out[f"model.layers.{index}"] = per
            index += 1
    out["model.norm"] = sixteen_bit_bytes(model.hidden_size)
    out["model.rotary_emb"] = 0
    out["lm_head"] = int(sixteen_bit_bytes(head_params) + logits
                         + (state([head_params]) if full_finetune and head_params else 0))
    return out


def estimate_memory(
    model: ModelSpec,
    gpu: GpuSpec,
    *,
    quantization: str = "dynamic-4bit",
    double_quant: bool = True,
    backend: str = "unsloth",
    seq_len: int = 2048,
    micro_batch_size: int = 1,
    lora_rank: int = DEFAULT_LORA_RANK,
    lora_targets: Sequence[str] | str = DEFAULT_LORA_TARGETS,
    full_finetune: bool = False,
    gradient_checkpointing: str = "unsloth",
    optimizer: str = "adamw_8bit",
    num_shards: int = 1,
    protected_bytes: int = 0,
    kbit_upcast: bool | None = None,
) -> MemoryEstimate:
    """Peak memory of one worker for one fixed configuration.

    `num_shards` > 1 models ZeRO-3 (the hf backend): weights, adapters, gradients and optimizer states
    are split over that many GPUs, plus the module DeepSpeed gathers whole before using it; 4-bit
    weights are sharded as packed codes in 16-bit storage (weights.zero3_weight_bytes).
    `protected_bytes` is what dynamic 4-bit spends keeping sensitive modules in 16-bit.
    `kbit_upcast`: whether peft's prepare_model_for_kbit_training runs (default: the hf backend on a
    4-bit base, planner.memory.weights.kbit_prepared); False models a 4-bit stack without it.
    """
    if seq_len < 1 or micro_batch_size < 1:
        raise PlanError(f"{{seq_len}} and {{micro_batch_size}} must be >= 1, got {seq_len} and "
                        f"{micro_batch_size}")
    if full_finetune and quantization not in ("bf16", "fp16"):
        raise PlanError(f"full fine-tuning needs 16-bit weights, not {quantization}. To fix: set "
                        "{quantization} to bf16 (or fp16), or turn off {full_finetune} to train LoRA "
                        "adapters.")
    if num_shards < 1:
        raise PlanError(f"num_shards must be >= 1, got {num_shards}")
    targets = () if full_finetune else model.resolve_targets(
        lora_targets if isinstance(lora_targets, str) else tuple(lora_targets))

    tensors = trainable_tensors(model, targets=targets, lora_rank=lora_rank, full_finetune=full_finetune)
    trainable = sum(tensors)
    if kbit_upcast is None:
        # Under ZeRO-3 the loader skips prepare_model_for_kbit_training (rayquant.loading): its fp32
        # upcast would defeat the sharding, so nothing is upcast there.
        kbit_upcast = kbit_prepared(backend, quantization) and num_shards == 1
    weights = weight_bytes(model, quantization=quantization, double_quant=double_quant, backend=backend,
                           protected_bytes=protected_bytes, kbit_upcast=kbit_upcast)
    adapters = adapter_bytes(trainable, full_finetune)
    gradients = gradient_bytes(trainable, full_finetune)
    opt, paged = optimizer_bytes(tensors, optimizer, full_finetune)
    loading = 0  # host RAM held only while the base loads, before training starts
    if num_shards > 1:
        loading = zero3_load_host_bytes(model, quantization=quantization, double_quant=double_quant,
                                        protected_bytes=protected_bytes)
        # ZeRO-3 splits the persistent state and gathers one module's weights at a time.
        weights = zero3_weight_bytes(model, quantization=quantization, double_quant=double_quant,
                                     protected_bytes=protected_bytes, num_shards=num_shards)
        adapters, gradients, opt, paged = (math.ceil(x / num_shards)
                                           for x in (adapters, gradients, opt, paged))

    decoder = activations(model, quantization=quantization, backend=backend, full_finetune=full_finetune,
                          targets=targets, gradient_checkpointing=gradient_checkpointing,
                          tokens=micro_batch_size * seq_len, kbit_upcast=kbit_upcast)
    logits = logit_bytes(model, gpu, backend=backend, micro_batch_size=micro_batch_size, seq_len=seq_len,
                         full_finetune=full_finetune, kbit_upcast=kbit_upcast)
    activation = decoder.gpu_bytes(logits)
    context, slack = context_bytes(gpu), slack_bytes(activation + logits)
    overhead = context + workspace_bytes(gpu) + slack

    breakdown = MemoryBreakdown(weights=int(weights), adapters=int(adapters), gradients=int(gradients),
                                optimizer=int(opt), activations=int(activation), logits=int(logits),
                                overhead=int(overhead))
    return MemoryEstimate(
        breakdown=breakdown,
        peak_bytes=breakdown.total,
        host_bytes=int(max(host_bytes(decoder, paged), loading)),
        capacity_bytes=int(gpu.memory_bytes),
        trainable_params=int(trainable),
        module_bytes=_module_bytes(model, quantization=quantization, double_quant=double_quant,
                                   targets=targets, lora_rank=lora_rank, full_finetune=full_finetune,
                                   optimizer=optimizer, kept_per_layer=decoder.kept_per_layer,
                                   logits=logits),
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


def estimate_with_protection(model: ModelSpec, gpu: GpuSpec, *, safety_margin: float,
                             **config) -> tuple[MemoryEstimate, Protection | None]:
    """estimate_memory with dynamic 4-bit's protected modules priced in: the worker may spend what
    the configuration leaves free under the budget (memory less `safety_margin`) on them, so the
    peak includes what the shared rule (planner.memory.protected) buys with it and never passes the
    budget. Other schemes: the plain estimate and None."""
    config.pop("protected_bytes", None)
    base = estimate_memory(model, gpu, **config)
    if config.get("quantization", "dynamic-4bit") != "dynamic-4bit":
        return base, None
    spare = budget_bytes(gpu.memory_bytes, safety_margin) - base.peak_bytes
    protection = planned_protection(model, spare, double_quant=config.get("double_quant", True),
                                    backend=config.get("backend", "unsloth"))
    if not protection.cost_bytes:
        return base, protection
    return estimate_memory(model, gpu, protected_bytes=protection.cost_bytes, **config), protection
