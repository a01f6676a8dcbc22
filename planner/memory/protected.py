"""Dynamic 4-bit's protected modules: which linears stay 16-bit, and what that costs.

The one rule, shared by the worker (rayquant.dynamic4bit measures the NF4 errors and calls
select_protected) and the planner (planned_protection prices it before any weight is read):

  - candidates: every decoder-layer linear bitsandbytes would quantize (not ALREADY_16BIT);
  - order: the projections of the first and last decoder layers (they see the raw embeddings and feed
    the head; Unsloth's dynamic quants keep such modules unquantized for the same reason), then the
    others by their measured NF4 error ||W - dq(q(W))|| / ||W||, largest first;
  - greedy within the budget: a module that does not fit is passed over for smaller ones after it.

A protected module costs its 16-bit bytes minus its NF4 bytes (protect_cost_bytes); with the hf
backend, peft's prepare_model_for_kbit_training upcasts it to fp32, so it costs 4 B per weight
(protection_weight_bytes). The budget is what the plan leaves free under the safety margin, so
protecting never eats into the margin.

The planner cannot read the weights: it orders the non-edge candidates by name (their errors are
unknown until the worker loads), so its edge modules are exact and the rest stand in for the ones
the worker picks by error: the bytes agree where the layers are alike (every layer has the same
linears), the names of the non-edge modules do not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from planner.architecture import ModelSpec
from planner.tensor_bytes import SIXTEEN_BIT_BYTES, nf4_bytes

# Modules bitsandbytes never quantizes in our loads (Unsloth's SKIP_QUANTIZATION_MODULES, unsloth_zoo/
# peft_utils.py): they are 16-bit already, so protecting them costs nothing and gains nothing.
ALREADY_16BIT = ("lm_head", "router", "mlp.gate", "block_sparse_moe.gate", "moe.gate", "mamba",
                 "vision_tower", "audio_tower", "multi_modal_projector")
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# peft prepare_model_for_kbit_training (called by the hf backend on 4-bit bases) upcasts every
# non-4-bit parameter to fp32, protected modules included.
_HF_KBIT_BYTES = 4
_ATTENTION = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")


def protection_weight_bytes(backend: str) -> int:
    """Bytes per weight of a protected module once training starts: 2 (16-bit), 4 with the hf
    backend (fp32 after prepare_model_for_kbit_training)."""
    return _HF_KBIT_BYTES if backend == "hf" else SIXTEEN_BIT_BYTES


def protect_cost_bytes(numel: int, double_quant: bool = True, weight_bytes: int = SIXTEEN_BIT_BYTES) -> int:
    """Extra bytes of keeping one weight unquantized instead of NF4 (biases are 16-bit either way).

    The NF4 side leaves out the per-tensor code books (planner.tensor_bytes.nf4_bytes), which makes
    this cost an upper bound."""
    return weight_bytes * numel - nf4_bytes(numel, double_quant)


@dataclass(frozen=True)
class ModuleError:
    """The NF4 error of one linear layer's weight (measured by the worker; 0.0 = not yet known)."""

    name: str  # module name as in model.named_modules(), e.g. "model.layers.0.self_attn.q_proj"
    layer: int  # decoder layer index
    numel: int  # weight elements
    relative_error: float  # ||W - dq(q(W))||_F / ||W||_F


@dataclass(frozen=True)
class Protection:
    """Which modules stay 16-bit and what that costs: goes into the manifest as `as_dict()`."""

    protected: tuple[str, ...]
    cost_bytes: int  # sum of protect_cost_bytes over `protected`
    budget_bytes: int
    candidates: int  # quantizable modules considered
    reasons: Mapping[str, str] = field(default_factory=dict)  # module -> why it is protected
    module_bytes: Mapping[str, int] = field(default_factory=dict)  # module -> its cost

    def __post_init__(self) -> None:
        object.__setattr__(self, "protected", tuple(self.protected))
        object.__setattr__(self, "reasons", dict(self.reasons))
        object.__setattr__(self, "module_bytes", dict(self.module_bytes))
        if self.cost_bytes > self.budget_bytes:
            raise ValueError(f"protection costs {self.cost_bytes} bytes, over its budget of "
                             f"{self.budget_bytes}")

    def as_dict(self) -> dict:
        return {"protected_modules": list(self.protected), "protected_cost_bytes": self.cost_bytes,
                "protected_budget_bytes": self.budget_bytes, "candidates": self.candidates,
                "reasons": dict(self.reasons)}


def select_protected(errors: Sequence[ModuleError], budget_bytes: int, double_quant: bool = True,
                     weight_bytes: int = SIXTEEN_BIT_BYTES) -> Protection:
    """Choose the modules to keep unquantized: edge layers first, then by NF4 error, within the
    budget (the module docstring states the rule). `weight_bytes`: protection_weight_bytes."""
    if budget_bytes < 0:
        raise ValueError(f"protected budget must be >= 0 bytes, got {budget_bytes}")
    if not errors:
        return Protection((), 0, budget_bytes, 0)
    first, last = min(e.layer for e in errors), max(e.layer for e in errors)
    by_error = sorted(errors, key=lambda e: (-e.relative_error, e.name))
    edges = [e for e in by_error if e.layer in (first, last)]
    rest = [e for e in by_error if e.layer not in (first, last)]
    chosen, reasons, costs, spent = [], {}, {}, 0
    for rank, e in enumerate(edges + rest, start=1):
        cost = protect_cost_bytes(e.numel, double_quant, weight_bytes)
        if spent + cost > budget_bytes:
            continue
        spent += cost
        chosen.append(e.name)
        costs[e.name] = cost
        where = "first decoder layer" if e.layer == first else "last decoder layer"
        reasons[e.name] = (where if e.layer in (first, last) else
                           f"NF4 error {e.relative_error:.4f} (rank {rank - len(edges)} of {len(rest)})")
    return Protection(tuple(chosen), spent, budget_bytes, len(errors), reasons, costs)


def is_candidate(module_name: str) -> bool:
    """A decoder-layer module bitsandbytes would quantize (not one of ALREADY_16BIT)."""
    if LAYER_RE.search(module_name) is None:
        return False
    leaf_path = module_name + "."
    return not any(f".{skip}." in "." + leaf_path for skip in ALREADY_16BIT)


def layer_of(module_name: str) -> int:
    """The decoder layer index in a module name (model.layers.N.…)."""
    return int(LAYER_RE.search(module_name).group(1))


def candidate_modules(model: ModelSpec) -> list[ModuleError]:
    """The candidates as the worker finds them in the checkpoint (one 2-D weight per linear; MoE
    experts one per expert), with their errors not yet known."""
    from planner.memory.weights import layer_groups

    out: list[ModuleError] = []
    index = 0
    for linears, n_layers in layer_groups(model):
        for _ in range(n_layers):
            for x in linears:
                parent = "self_attn" if x.name in _ATTENTION else "mlp"
                names = ([f"model.layers.{index}.{parent}.experts.{j}.{x.name}" for j in range(x.count)]
                         if x.expert else [f"model.layers.{index}.{parent}.{x.name}"] * x.count)
                for name in names:
                    if is_candidate(name) and x.name not in ("gate", "shared_expert_gate"):
                        out.append(ModuleError(name, index, x.in_features * x.out_features, 0.0))
            index += 1
    return out


def planned_protection(model: ModelSpec, budget_bytes: int, *, double_quant: bool = True,
                       backend: str = "unsloth") -> Protection:
    """The protection the worker will buy with `budget_bytes`, priced before the weights are read
    (select_protected with unknown errors: see the module docstring)."""
    p = select_protected(candidate_modules(model), max(0, int(budget_bytes)), double_quant,
                         protection_weight_bytes(backend))
    reasons = {n: why if why.endswith("decoder layer") else BY_ERROR for n, why in p.reasons.items()}
    return Protection(p.protected, p.cost_bytes, p.budget_bytes, p.candidates, reasons, p.module_bytes)


BY_ERROR = "stands in for a module the worker picks by measured NF4 error"


def by_error_reason(p: Protection) -> tuple[int, int]:
    """(count, bytes) of the protected modules the worker picks by measured error (non-edge)."""
    picked = [n for n, why in p.reasons.items() if not why.endswith("decoder layer")]
    return len(picked), sum(p.module_bytes.get(n, 0) for n in picked)
