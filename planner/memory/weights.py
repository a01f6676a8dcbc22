"""The `weights` term: base weights by quantization scheme.

Decoder linears are stored by scheme (16-bit, NF4 with or without double quant, FP8 + row scales;
dynamic 4-bit = NF4 + the 16-bit modules it protects). Embeddings, lm_head, norms and biases always
stay 16-bit, and so does an MoE router under dynamic 4-bit and FP8 (Unsloth's dynamic quants skip it;
the FP8 paths only convert the projection linears).
"""

from __future__ import annotations

import math
from typing import Sequence

from planner.architecture import LinearShape, ModelSpec
from planner.tensor_bytes import SIXTEEN_BIT_BYTES, fp8_rowwise_bytes, nf4_tensor_bytes, sixteen_bit_bytes

FOUR_BIT = ("nf4", "dynamic-4bit")
# Routers kept 16-bit by every scheme except plain NF4 (which quantizes every linear).
ROUTERS = ("gate", "shared_expert_gate")
# peft prepare_model_for_kbit_training (peft/utils/other.py, "cast all non INT8 parameters to fp32"),
# which the hf backend calls for 4-bit bases, upcasts every 16-bit parameter that is not a Params4bit
# (embeddings, lm_head, norms, biases, protected 16-bit modules) to fp32.
KBIT_UPCAST_BYTES = 4


def layer_groups(model: ModelSpec) -> list[tuple[tuple[LinearShape, ...], int]]:
    """(linears of one layer, number of such layers): MoE models may keep some dense layers."""
    if not model.is_moe:
        return [(model.linear_layers(), model.num_layers)]
    out = [(model.linear_layers(), model.num_layers - model.num_dense_layers)]
    if model.num_dense_layers:
        out.append((model._dense_layer_linears(), model.num_dense_layers))
    return out


def layer_norm_params(model: ModelSpec) -> int:
    """Parameters of one layer beside its linears: norms of width h, q/k norms, attention sinks."""
    return (model.norms_per_layer * model.hidden_size + (2 * model.head_dim if model.qk_norm else 0)
            + (model.num_attention_heads if model.attention_sinks else 0))


def linear_scheme(x: LinearShape, quantization: str) -> str:
    """How one linear is stored under `quantization` (routers stay 16-bit, see ROUTERS)."""
    return "bf16" if x.name in ROUTERS and quantization != "nf4" else quantization


def linear_weight_bytes(x: LinearShape, scheme: str, double_quant: bool) -> int:
    """One LinearShape (all `count` copies) stored by `scheme`; its bias stays 16-bit."""
    numel = x.in_features * x.out_features
    bias = sixteen_bit_bytes(x.out_features) if x.bias else 0
    if scheme in FOUR_BIT:
        per = nf4_tensor_bytes(numel, double_quant)
    elif scheme == "fp8":
        per = fp8_rowwise_bytes(x.in_features, x.out_features)
    else:
        per = sixteen_bit_bytes(numel)
    return x.count * (per + bias)


def layer_weight_bytes(model: ModelSpec, linears: Sequence[LinearShape], quantization: str,
                       double_quant: bool) -> int:
    """One decoder layer's weights: its linears by scheme plus its 16-bit norms."""
    return (sum(linear_weight_bytes(x, linear_scheme(x, quantization), double_quant) for x in linears)
            + sixteen_bit_bytes(layer_norm_params(model)))


def embedding_bytes(model: ModelSpec) -> int:
    """The 16-bit input embedding (vocab x h)."""
    return sixteen_bit_bytes(model.vocab_size * model.hidden_size)


def head_bytes(model: ModelSpec) -> int:
    """The 16-bit lm_head (none of its own when tied to the embedding) and the final norm."""
    head_params = 0 if model.tie_word_embeddings else model.vocab_size * model.hidden_size
    return sixteen_bit_bytes(head_params + model.hidden_size)


def _sixteen_bit_beside_quantized(model: ModelSpec, quantization: str, double_quant: bool) -> int:
    """Bytes of the decoder's 16-bit parameters under a 4-bit scheme: biases of quantized linears,
    linears kept 16-bit (routers), norms. What prepare_model_for_kbit_training upcasts there."""
    total = 0
    for linears, n_layers in layer_groups(model):
        for x in linears:
            scheme = linear_scheme(x, quantization)
            if scheme in FOUR_BIT:
                total += n_layers * x.count * (sixteen_bit_bytes(x.out_features) if x.bias else 0)
            else:
                total += n_layers * linear_weight_bytes(x, scheme, double_quant)
        total += n_layers * sixteen_bit_bytes(layer_norm_params(model))
    return total


def kbit_prepared(backend: str, quantization: str) -> bool:
    """Whether the worker runs peft's prepare_model_for_kbit_training (the hf backend on a 4-bit
    base), which upcasts every 16-bit parameter beside the 4-bit ones to fp32."""
    return backend == "hf" and quantization in FOUR_BIT


def weight_bytes(model: ModelSpec, *, quantization: str, double_quant: bool, backend: str,
                 protected_bytes: int, kbit_upcast: bool | None = None) -> int:
    """The `weights` term of one unsharded worker.

    Decoder layers by scheme, 16-bit embedding, lm_head and final norm; dynamic 4-bit adds the
    `protected_bytes` it spends keeping sensitive modules unquantized (planner.memory.protected,
    already priced for the backend). With the hf backend a 4-bit base goes through
    prepare_model_for_kbit_training, which upcasts every other 16-bit parameter to fp32
    (KBIT_UPCAST_BYTES).
    """
    protected = protected_bytes if quantization == "dynamic-4bit" else 0
    edges = embedding_bytes(model) + head_bytes(model)
    weights = edges + protected + sum(n * layer_weight_bytes(model, linears, quantization, double_quant)
                                      for linears, n in layer_groups(model))
    if kbit_prepared(backend, quantization) if kbit_upcast is None else kbit_upcast:
        upcast = _sixteen_bit_beside_quantized(model, quantization, double_quant) + edges
        weights += upcast * (KBIT_UPCAST_BYTES - SIXTEEN_BIT_BYTES) // SIXTEEN_BIT_BYTES
    return weights


# transformers fills DeepSpeed's "auto" stage3_prefetch_bucket_size with 0.9 x hidden_size^2
# elements (transformers/integrations/deepspeed.py, HfTrainerDeepSpeedConfig.trainer_config_finalize).
ZERO3_PREFETCH_BUCKET_PER_H2 = 0.9
# DeepSpeed keeps a module's parameters gathered after it runs when they are used again within the
# next stage3_max_reuse_distance elements of the module trace (default 1e9, deepspeed/runtime/zero/
# config.py; partitioned_param_coordinator.py __params_to_release). rayquant.zero leaves it default.
ZERO3_MAX_REUSE_DISTANCE = 10**9


def _quant_state_bytes(linears: Sequence[LinearShape], quantization: str, double_quant: bool) -> int:
    """Bytes of the QuantStates of one layer's NF4 linears (absmax statistics and code books): all
    of nf4_tensor_bytes but the packed codes. 0 for the other schemes."""
    total = 0
    for x in linears:
        if linear_scheme(x, quantization) in FOUR_BIT:
            numel = x.in_features * x.out_features
            total += x.count * (nf4_tensor_bytes(numel, double_quant) - math.ceil(numel / 2))
    return total


def zero3_weight_bytes(model: ModelSpec, *, quantization: str, double_quant: bool, protected_bytes: int,
                       num_shards: int) -> int:
    """The `weights` term of one of `num_shards` ZeRO-3 ranks (the hf backend).

    ZeRO-3 partitions every parameter over the ranks and all-gathers a module's parameters whole
    just before it runs (deepspeed/runtime/zero/partition_parameters.py). A 4-bit base is loaded with
    bnb_4bit_quant_storage = the compute dtype (rayquant.zero.bnb_config_kwargs), so its packed NF4
    codes are a 16-bit Params4bit that ZeRO shards like any other weight; each QuantState (absmax,
    code books) is an attribute of the parameter, not a parameter, and every rank keeps it whole.
    No fp32 upcast (KBIT_UPCAST_BYTES): rayquant.loading skips prepare_model_for_kbit_training under
    ZeRO-3. Per rank: the parameters / num_shards, the quant states, the largest module gathered
    whole (embedding, lm_head or a decoder layer, as stored: the 16-bit copy bitsandbytes dequantizes
    one weight at a time is the activations term's dequant_transient_bytes), and the next module's
    parameters prefetched (at most the prefetch bucket). Where the forward turns into the backward,
    the lm_head is gathered together with the last decoder layers whose reuse (their backward, after
    the head and the layers between them, twice) lies within ZERO3_MAX_REUSE_DISTANCE elements.
    """
    # backend "zero3" is not "hf" to weight_bytes: the whole base without the kbit upcast.
    whole = weight_bytes(model, quantization=quantization, double_quant=double_quant, backend="zero3",
                         protected_bytes=protected_bytes)
    states = sum(n * _quant_state_bytes(linears, quantization, double_quant)
                 for linears, n in layer_groups(model))
    layers = [layer_weight_bytes(model, linears, quantization, double_quant)
              - _quant_state_bytes(linears, quantization, double_quant) for linears, _ in layer_groups(model)]
    head, layer = head_bytes(model), max(layers)
    largest = max(layer, embedding_bytes(model), head)
    # Elements are of the 16-bit storage (packed 4-bit codes included): bytes / 2.
    window = ZERO3_MAX_REUSE_DISTANCE - head // SIXTEEN_BIT_BYTES
    kept = 0 if window <= 0 else min(model.num_layers,
                                     (window - 1) // (2 * layer // SIXTEEN_BIT_BYTES) + 1)
    bucket = int(ZERO3_PREFETCH_BUCKET_PER_H2 * model.hidden_size ** 2) * SIXTEEN_BIT_BYTES
    return (math.ceil((whole - states) / num_shards) + states + max(largest, head + kept * layer)
            + min(bucket, layer))


def zero3_load_host_bytes(model: ModelSpec, *, quantization: str, double_quant: bool, protected_bytes: int) -> int:
    """Host RAM a ZeRO-3 rank holds while it loads a 4-bit base: all of it, quantized on the CPU,
    before it is partitioned (rayquant.zero.partition_quantized_model; transformers builds quantized
    models without zero.Init). 0 for 16-bit bases, which load under zero.Init shard by shard."""
    if quantization not in FOUR_BIT:
        return 0
    return weight_bytes(model, quantization=quantization, double_quant=double_quant, backend="zero3",
                        protected_bytes=protected_bytes)
