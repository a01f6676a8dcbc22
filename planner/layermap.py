"""Layer-to-GPU map for one worker spanning a node's GPUs (a dict device_map for Unsloth/HF)."""

from __future__ import annotations

from typing import Mapping, Sequence

from planner.hardware import GIB
from planner.architecture import ModelSpec
from planner.plan import PlanError


def _fill(layer_bytes: Sequence[int], room: Sequence[int], fraction: float) -> list[int] | None:
    """Contiguous layers per GPU, each filled up to `fraction` of its room; None if some are left."""
    counts = []
    i = 0
    for r in room:
        used = n = 0
        while i < len(layer_bytes) and used + layer_bytes[i] <= r * fraction:
            used += layer_bytes[i]
            i += 1
            n += 1
        counts.append(n)
    return counts if i == len(layer_bytes) else None


def layer_device_map(model: ModelSpec, per_layer_bytes: Mapping[str, int],
                     gpu_budgets: Sequence[int]) -> dict[str, int]:
    """Map HF module names to local GPU indices.

    The embeddings (and rotary embedding) go on the first GPU, the final norm and lm_head (whose
    entry includes the room for logits) on the last; decoder layers are split into contiguous runs
    so every GPU is filled to the same fraction of its budget. Raises PlanError if the modules do
    not fit the budgets.
    """
    if not gpu_budgets:
        raise PlanError("layer_device_map needs at least one GPU budget")
    L = model.num_layers
    names = [f"model.layers.{i}" for i in range(L)]
    missing = [n for n in ["model.embed_tokens", "lm_head", *names] if n not in per_layer_bytes]
    if missing:
        raise PlanError(f"per_layer_bytes lacks {', '.join(missing[:3])}"
                        + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    first = per_layer_bytes["model.embed_tokens"] + per_layer_bytes.get("model.rotary_emb", 0)
    last = per_layer_bytes["lm_head"] + per_layer_bytes.get("model.norm", 0)
    room = list(gpu_budgets)
    room[0] -= first
    room[-1] -= last
    layers = [per_layer_bytes[n] for n in names]
    total = sum(layers) + first + last
    if min(room) < 0 or total > sum(gpu_budgets):
        short = max(total - sum(gpu_budgets), -min(room))
        raise PlanError(f"{model.name} does not fit {len(gpu_budgets)} GPU(s) with budgets "
                        f"{', '.join(f'{b / GIB:.1f}' for b in gpu_budgets)} GiB: "
                        f"{short / GIB:.2f} GiB short")
    # Binary search on the fill fraction: the smallest that still places every layer balances them.
    counts = _fill(layers, room, 1.0)
    if counts is None:
        raise PlanError(f"{model.name}'s layers cannot be split over {len(gpu_budgets)} GPU(s) with "
                        f"budgets {', '.join(f'{b / GIB:.1f}' for b in gpu_budgets)} GiB: a layer "
                        f"({max(layers) / GIB:.2f} GiB) does not fit the room left")
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        c = _fill(layers, room, mid)
        if c is None:
            lo = mid
        else:
            hi, counts = mid, c
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0}
    i = 0
    for g, n in enumerate(counts):
        for _ in range(n):
            device_map[names[i]] = g
            i += 1
    device_map["model.norm"] = len(gpu_budgets) - 1
    device_map["lm_head"] = len(gpu_budgets) - 1
    return device_map


def bytes_per_gpu(device_map: Mapping[str, int], per_layer_bytes: Mapping[str, int],
                  num_gpus: int) -> list[int]:
    """Bytes the map puts on each GPU."""
    out = [0] * num_gpus
    for name, g in device_map.items():
        out[g] += per_layer_bytes.get(name, 0)
    return out
