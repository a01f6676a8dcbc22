"""Re-planning a running job: one step cheaper for a node type that ran out of memory, and the
settings a restart changed.

When a worker runs out of memory although the plan said it fits, the driver (rayquant.trainer)
re-plans that node type one rung down this ladder and restarts from the last checkpoint:

1. the next smaller micro-batch that divides the worker's samples per step, with as much more
   gradient accumulation, so each worker's share of the global batch (and the global batch) stays;
2. at the smallest micro-batch: gradient checkpointing (none -> hf -> unsloth, which also offloads
   the layer inputs to host RAM; unsloth only on the unsloth backend);
3. then the 8-bit optimizer (adamw_torch -> adamw_8bit -> paged_adamw_8bit, whose states page to
   host RAM);
4. then 4-bit weights (16-bit, FP8 or dynamic 4-bit -> nf4: dynamic 4-bit would spend memory the plan
   thought free on 16-bit modules), for LoRA outside ZeRO-3.

A setting the user pinned in the job is never changed. When no rung is left, NothingCheaperError
says how much memory the worker saw and what would fit. Settings in messages are {placeholders}
(planner.vocab). Standard library only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from planner.architecture import ModelSpec
from planner.hardware import GIB, lookup_gpu
from planner.memory import estimate_memory
from planner.plan import JobSpec, NodePlan, PlanError, TrainingPlan
from planner.throughput import tokens_per_second
from planner.vocab import OPTIMIZERS

# The settings a rung may change, in ladder order, and the JobSpec field that pins each.
LADDER_SETTINGS = ("micro_batch_size", "gradient_checkpointing", "optimizer", "quantization")
_CHECKPOINTING_ORDER = ("none", "hf", "unsloth")
# Straight to NF4: dynamic 4-bit spends what the plan leaves free on 16-bit modules, and after an
# out-of-memory error nothing the plan left free is to be trusted.
_QUANTIZATION_NEXT = {"bf16": "nf4", "fp16": "nf4", "fp8": "nf4", "dynamic-4bit": "nf4"}
# The settings compared between two plans (rayquant's restart records show those that changed).
COMPARED = ("nodes", "micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
            "optimizer", "quantization", "placement")
# How restart lines name them.
NAMES = {"nodes": "nodes", "micro_batch_size": "micro-batch", "gradient_accumulation_steps": "accumulation",
         "gradient_checkpointing": "checkpointing", "optimizer": "optimizer",
         "quantization": "quantization", "placement": "placement", "num_workers": "workers",
         "global_batch_size": "global batch"}


class NothingCheaperError(PlanError):
    """A node type ran out of memory at the cheapest setting the ladder has for it."""


@dataclass(frozen=True)
class Replan:
    """A plan re-planned after a fault, with the settings that changed (restart records)."""

    plan: TrainingPlan
    node_type: str
    before: Mapping[str, Any]
    after: Mapping[str, Any]

    @property
    def summary(self) -> str:
        """`micro-batch 4 -> 2, accumulation 1 -> 2`."""
        return describe_changes(self.before, self.after)


def cheaper(node_plan: NodePlan, job: JobSpec) -> dict[str, Any] | None:
    """The next rung down the ladder for `node_plan` (the fields it changes), or None when every
    rung is spent or pinned."""
    samples = node_plan.samples_per_step
    if job.micro_batch_size is None:
        smaller = [d for d in range(node_plan.micro_batch_size - 1, 0, -1) if samples % d == 0]
        if smaller:
            return {"micro_batch_size": smaller[0], "gradient_accumulation_steps": samples // smaller[0]}
    if job.gradient_checkpointing is None:
        modes = [m for m in _CHECKPOINTING_ORDER if m != "unsloth" or node_plan.backend == "unsloth"]
        if node_plan.gradient_checkpointing in modes:
            later = modes[modes.index(node_plan.gradient_checkpointing) + 1:]
            if later:
                return {"gradient_checkpointing": later[0]}
    if job.optimizer is None:
        later = OPTIMIZERS[OPTIMIZERS.index(node_plan.optimizer) + 1:]
        if later:
            return {"optimizer": later[0]}
    if (job.quantization is None and not job.full_finetune and node_plan.placement != "zero3"
            and node_plan.quantization in _QUANTIZATION_NEXT):
        return {"quantization": _QUANTIZATION_NEXT[node_plan.quantization]}
    return None


def _estimated(node_plan: NodePlan, job: JobSpec, model: ModelSpec | None) -> NodePlan:
    """`node_plan` with its predicted peak, breakdown and tokens/s for its (changed) settings; as it
    is without a model spec, and for node-spanning workers, whose layer map still holds (a cheaper
    setting shrinks no module)."""
    if model is None or node_plan.placement == "node-spanning":
        return node_plan
    gpu = lookup_gpu(node_plan.gpu)
    shards = node_plan.nodes * node_plan.gpus_per_node if node_plan.placement == "zero3" else 1
    config = dict(quantization=node_plan.quantization, seq_len=job.seq_len,
                  micro_batch_size=node_plan.micro_batch_size, lora_rank=job.lora_rank,
                  lora_targets=job.lora_targets, full_finetune=job.full_finetune,
                  gradient_checkpointing=node_plan.gradient_checkpointing, num_shards=shards)
    est = estimate_memory(model, gpu, double_quant=node_plan.double_quant, backend=node_plan.backend,
                          optimizer=node_plan.optimizer, **config)
    tps = tokens_per_second(model, gpu, fp8_path=node_plan.fp8_path, **config)
    return dataclasses.replace(node_plan, peak_memory_bytes=est.peak_bytes, breakdown=est.breakdown,
                               tokens_per_second=tps, host_memory_bytes=est.host_bytes)


def replan_out_of_memory(plan: TrainingPlan, node_type: str, *, model: ModelSpec | None = None,
                         step: int | None = None, seen_bytes: int | None = None,
                         capacity_bytes: int | None = None) -> Replan:
    """`plan` with `node_type` one rung cheaper (see the module docstring). ZeRO-3 node types move
    together (their ranks share one micro-batch and accumulation). With `model`, the changed node
    plans carry new predictions. Raises NothingCheaperError (with `seen_bytes` of
    `capacity_bytes`, the worker's memory when it failed, in the message)."""
    failed = plan.node_plan(node_type)
    change = cheaper(failed, plan.job)
    if change is None:
        raise NothingCheaperError(nothing_cheaper_message(plan, node_type, model=model, step=step,
                                                          seen_bytes=seen_bytes, capacity_bytes=capacity_bytes))
    moved = ({p.node_type for p in plan.node_plans if p.placement == "zero3"} if failed.placement == "zero3"
             else {node_type})
    at = f" at step {step}" if step is not None else ""
    seen = f" ({seen_bytes / GIB:.2f} GiB seen)" if seen_bytes else ""
    node_plans = []
    for p in plan.node_plans:
        if p.node_type in moved:
            reasons = dict(p.reasons)
            for key, value in change.items():
                reasons[key] = f"re-planned to {value} after running out of memory{at}{seen}"
            p = _estimated(dataclasses.replace(p, **change, reasons=reasons), plan.job, model)
            if p.quantization != "dynamic-4bit":
                p = dataclasses.replace(p, protected_budget_bytes=0)
            if p.quantization != "fp8":
                p = dataclasses.replace(p, fp8_path=None)
        node_plans.append(p)
    new = dataclasses.replace(plan, node_plans=tuple(node_plans))
    before, after = changed_settings(plan, new, node_type)
    return Replan(new, node_type, before, after)


def _settings(plan: TrainingPlan, node_type: str) -> dict[str, Any]:
    try:
        p = plan.node_plan(node_type)
    except KeyError:  # the node type is gone from the plan
        return {"nodes": 0}
    return {k: getattr(p, k) for k in COMPARED}


def changed_settings(before: TrainingPlan, after: TrainingPlan,
                     node_type: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings that differ between two plans, as (before, after): `node_type`'s own (nodes,
    micro-batch, accumulation, checkpointing, optimizer, quantization, placement), the job's
    num_workers and global_batch_size, and for other node types that changed, theirs under
    "node_types" ({type: {...}})."""
    old, new = {}, {}
    a, b = _settings(before, node_type), _settings(after, node_type)
    for k in a.keys() | b.keys():
        if a.get(k) != b.get(k):
            old[k], new[k] = a.get(k), b.get(k)
    for k in ("num_workers", "global_batch_size"):
        if getattr(before, k) != getattr(after, k):
            old[k], new[k] = getattr(before, k), getattr(after, k)
    others = ({p.node_type for p in before.node_plans} | {p.node_type for p in after.node_plans}) - {node_type}
    for t in sorted(others):
        x, y = changed_settings_of_type(before, after, t)
        if x:
            old.setdefault("node_types", {})[t] = x
            new.setdefault("node_types", {})[t] = y
    return dict(sorted(old.items())), dict(sorted(new.items()))


def changed_settings_of_type(before: TrainingPlan, after: TrainingPlan, node_type: str):
    a, b = _settings(before, node_type), _settings(after, node_type)
    keys = [k for k in a.keys() | b.keys() if a.get(k) != b.get(k)]
    return {k: a.get(k) for k in sorted(keys)}, {k: b.get(k) for k in sorted(keys)}


def describe_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """`micro-batch 4 -> 2, accumulation 1 -> 2` (other node types as `on CPU:2: ...`)."""
    parts = [f"{NAMES.get(k, k)} {before.get(k)} -> {after.get(k)}"
             for k in sorted(before.keys() | after.keys(), key=_order) if k != "node_types"]
    for t, old in (before.get("node_types") or {}).items():
        parts.append(f"on {t}: " + describe_changes(old, (after.get("node_types") or {}).get(t, {})))
    return ", ".join(parts) or "no setting changed"


def _order(key: str) -> int:
    order = ("num_workers", "nodes", "micro_batch_size", "gradient_accumulation_steps",
             "gradient_checkpointing", "optimizer", "quantization", "placement", "global_batch_size")
    return order.index(key) if key in order else len(order)


def nothing_cheaper_message(plan: TrainingPlan, node_type: str, *, model: ModelSpec | None = None,
                            step: int | None = None, seen_bytes: int | None = None,
                            capacity_bytes: int | None = None) -> str:
    """Why the ladder is spent on `node_type`, the memory seen, and what would fit."""
    p = plan.node_plan(node_type)
    job = plan.job
    at = f" at step {step}" if step is not None else ""
    setting = (f"{{micro_batch_size}} {p.micro_batch_size}, {{gradient_checkpointing}} "
               f"{p.gradient_checkpointing}, {{optimizer}} {p.optimizer}, {{quantization}} {p.quantization}")
    capacity = capacity_bytes or lookup_gpu(p.gpu).memory_bytes
    seen = (f"{seen_bytes / GIB:.2f} GiB in use of {capacity / GIB:.2f} GiB" if seen_bytes
            else f"its {capacity / GIB:.2f} GiB")
    lines = [f"{node_type} ran out of memory{at} with the cheapest setting rayquant can re-plan to "
             f"({setting}): {seen}; the planner predicted a peak of {p.peak_memory_bytes / GIB:.2f} GiB."]
    fits = _seq_len_that_fits(p, job, model, seen_bytes, capacity)
    fixes = []
    if fits:
        fixes.append(f"lower {{seq_len}} from {job.seq_len} to at most {fits} (what this setting "
                     f"should fit, the prediction scaled by the memory seen)")
    else:
        fixes.append(f"lower {{seq_len}} (now {job.seq_len})")
    if not job.full_finetune:
        fixes.append(f"a smaller {{lora_rank}} (now {job.lora_rank})")
    pinned = [f"{{{name}}} (pinned to {getattr(job, name)})" for name in LADDER_SETTINGS
              if getattr(job, name) is not None]
    if pinned:
        fixes.append("unpin " + ", ".join(pinned) + " so the re-plan may change it")
    fixes.append(f"leave {node_type} out of {{gpus}} or use GPUs with more memory")
    lines.append("To fix: " + "; or ".join(fixes) + ".")
    return "\n".join(lines)


def _seq_len_that_fits(p: NodePlan, job: JobSpec, model: ModelSpec | None, seen_bytes: int | None,
                       capacity: int) -> int | None:
    """The longest sequence whose predicted peak, scaled by how far the prediction fell short at
    this seq_len, stays within the memory budget; None without a model (or for node-spanning
    workers, whose peak is a layer map's)."""
    if model is None or p.placement == "node-spanning":
        return None
    gpu = lookup_gpu(p.gpu)
    shards = p.nodes * p.gpus_per_node if p.placement == "zero3" else 1

    def peak(seq_len: int) -> int:
        return estimate_memory(model, gpu, quantization=p.quantization, double_quant=p.double_quant,
                               backend=p.backend, seq_len=seq_len, micro_batch_size=p.micro_batch_size,
                               lora_rank=job.lora_rank, lora_targets=job.lora_targets,
                               full_finetune=job.full_finetune, gradient_checkpointing=p.gradient_checkpointing,
                               optimizer=p.optimizer, num_shards=shards).peak_bytes

    # The worker needed more than the device holds (and more than it saw in use): a lower bound on
    # how far the prediction fell short.
    ratio = max(1.0, max(seen_bytes or 0, capacity) / peak(job.seq_len))
    budget = min(p.memory_budget_bytes, capacity)
    lo, hi = 0, job.seq_len - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if math.ceil(peak(mid) * ratio) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo or None


def out_of_memory_measurement(plan: TrainingPlan, node_type: str, model: ModelSpec, *, seen_bytes: int,
                              reserved_bytes: int, gpu_nvml_name: str = ""):
    """A calibration Measurement (planner.calibration) from a worker that ran out of memory: what
    torch's allocator held when it failed, next to the plan's prediction for that node type. The
    allocation that failed is not in `seen_bytes`, so the measured/predicted ratio is a lower bound:
    a plan calibrated with it shrinks at least that much."""
    from planner.calibration import Measurement

    p = plan.node_plan(node_type)
    job = plan.job
    shards = p.nodes * p.gpus_per_node if p.placement == "zero3" else 1
    est = estimate_memory(model, lookup_gpu(p.gpu), quantization=p.quantization, double_quant=p.double_quant,
                          backend=p.backend, seq_len=job.seq_len, micro_batch_size=p.micro_batch_size,
                          lora_rank=job.lora_rank, lora_targets=job.lora_targets,
                          full_finetune=job.full_finetune, gradient_checkpointing=p.gradient_checkpointing,
                          optimizer=p.optimizer, num_shards=shards)
    return Measurement(gpu=p.gpu, quantization=p.quantization, model=plan.model, seq_len=job.seq_len,
                       micro_batch_size=p.micro_batch_size, predicted_peak_bytes=est.peak_bytes,
                       predicted_allocated_bytes=est.allocated_bytes, measured_allocated_bytes=seen_bytes,
                       measured_reserved_bytes=max(reserved_bytes, seen_bytes),
                       gradient_checkpointing=p.gradient_checkpointing, backend=p.backend,
                       gpu_nvml_name=gpu_nvml_name)
