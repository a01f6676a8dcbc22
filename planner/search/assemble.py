"""make_plan: search every node type, split the global batch, and assemble the TrainingPlan."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from planner.architecture import ModelSpec
from planner.calibration import Calibration
from planner.hardware import NodeType, fp8_path_for
from planner.memory.protected import planned_protection
from planner.model import load_model_spec
from planner.plan import JobSpec, NodePlan, PlanError, TrainingPlan, WorkerAssignment
from planner.search.batching import distribute, divisors, pacing_warnings
from planner.search.candidates import TypeSearch, best_candidate, search_type
from planner.search.policy import MAX_MICRO_BATCH, better, compute_dtype
from planner.search.reasons import reasons, shortfall

# No calibration file: every factor is 1.0 (Calibration's rule where it has no measurement).
UNCALIBRATED = Calibration(measurements=())


def _node_plan(spec: ModelSpec, ts: TypeSearch, job: JobSpec, samples: int,
               calibration: Calibration) -> NodePlan:
    """The settings of one node type for its `samples` per optimizer step."""
    nt = ts.node_type
    micro = divisors(samples, MAX_MICRO_BATCH) if job.micro_batch_size is None else (job.micro_batch_size,)
    # Each quantization's best at these micro-batches (the reason names them all), then the best.
    options = {q: best_candidate(spec, nt, job, ts.budget, (q,), ts.placement, micro, calibration)
               for q in ts.quantizations}
    cfg = None
    for c in options.values():
        if better(c, cfg, job):
            cfg = c
    if cfg is None:  # the largest divisor exceeded what fits; the share search used a fitting size
        cfg = ts.best
        samples = cfg.micro_batch * max(1, round(samples / cfg.micro_batch))
    accum = samples // cfg.micro_batch
    # Dynamic 4-bit may spend what the plan leaves free keeping sensitive modules unquantized: the
    # peak and the weights include what the shared rule buys (planner.memory.protected), and the
    # budget, margin included, still holds.
    spare = max(0, ts.budget - cfg.peak_bytes) if cfg.quantization == "dynamic-4bit" else 0
    protected = planned_protection(spec, spare, double_quant=job.double_quant,
                                   backend=cfg.backend).cost_bytes if spare else 0
    breakdown = cfg.estimate.breakdown
    if protected:
        breakdown = dataclasses.replace(breakdown, weights=breakdown.weights + protected)
    return NodePlan(
        node_type=nt.key, gpu=nt.gpu.name, nodes=nt.count, gpus_per_node=nt.gpus_per_node,
        quantization=cfg.quantization,
        compute_dtype=compute_dtype(nt.gpu),
        micro_batch_size=cfg.micro_batch, gradient_accumulation_steps=accum,
        optimizer=cfg.optimizer, gradient_checkpointing=cfg.checkpointing,
        placement=cfg.placement, backend=cfg.backend, workers_per_node=ts.workers_per_node,
        gpus_per_worker=nt.gpus_per_node if cfg.placement == "node-spanning" else 1,
        peak_memory_bytes=cfg.peak_bytes + protected, memory_budget_bytes=ts.budget,
        breakdown=breakdown, tokens_per_second=cfg.tokens_per_s,
        reasons=reasons(ts, cfg, job, accum, samples, options, spec), double_quant=job.double_quant,
        fp8_path=fp8_path_for(nt.gpu.compute_capability) if cfg.quantization == "fp8" else None,
        protected_budget_bytes=spare,
        device_map=cfg.device_map, host_memory_bytes=cfg.estimate.host_bytes)


def check_host_ram(nt: NodeType, node_plan: NodePlan) -> None:
    """Refuse a plan whose workers need more host RAM than a node has: the layer inputs Unsloth's
    offloaded checkpointing pins (planner.memory.activations.unsloth_offload_host_bytes) and paged
    optimizer states, per worker, times the workers on a node. Unknown node RAM (0) is not checked;
    the CPU pseudo-device's memory is host RAM and is budgeted as its device memory already."""
    if nt.gpu.is_cpu or not nt.host_memory_bytes or not node_plan.host_memory_bytes:
        return
    need = node_plan.workers_per_node * node_plan.host_memory_bytes
    if need <= nt.host_memory_bytes:
        return
    gib = 1024**3
    raise PlanError(
        f"{nt.key}: {node_plan.workers_per_node} worker(s) x {node_plan.host_memory_bytes / gib:.1f} GiB of "
        f"host RAM (layer inputs offloaded by {{gradient_checkpointing}} {node_plan.gradient_checkpointing}"
        f", paged optimizer states) = {need / gib:.1f} GiB, more than the node's "
        f"{nt.host_memory_bytes / gib:.1f} GiB: the plan fits the GPUs but not the host. To fix: set "
        f"{{gradient_checkpointing}} hf or {{backend}} hf (layer inputs stay on the GPU), lower "
        f"{{seq_len}} or {{micro_batch_size}}, or use nodes with more RAM.")


def _workers(node_plans: Sequence[NodePlan]) -> tuple[WorkerAssignment, ...]:
    """World ranks in node-plan order: every worker of a node, node by node."""
    slots = [(p.node_type, node, local) for p in node_plans for node in range(p.nodes)
             for local in range(p.workers_per_node)]
    return tuple(WorkerAssignment(rank=rank, node_type=t, node_index=node, local_rank=local)
                 for rank, (t, node, local) in enumerate(slots))


def make_plan(model: ModelSpec | str, node_types: Sequence[NodeType], job: JobSpec,
              calibration: Calibration | None = None) -> TrainingPlan:
    """Plan a job on an inventory.

    `calibration` (from `rayquant calibrate`) scales predicted peak memory (its allocator part) by
    memory_factor(gpu, quantization) before the budget check, and tokens/s by
    throughput_factor(gpu, quantization); None uses the models as they are. Node types where
    nothing fits are left out with a warning; a PlanError says what is missing when none fits.
    """
    spec = load_model_spec(model) if isinstance(model, str) else model
    if not node_types:
        raise PlanError("the inventory is empty. To fix: pass {gpus} like 2x8xH100-80GB,4x1xA10G")
    if not job.full_finetune:
        spec.resolve_targets(job.lora_targets)  # fail early on unknown targets
    calibration = calibration or UNCALIBRATED
    searched = [search_type(spec, nt, job, calibration) for nt in node_types]
    usable = [t for t in searched if t.best is not None]
    failed = [t for t in searched if t.best is None]
    if not usable:
        raise PlanError(f"{spec.name} does not fit any node type at {{seq_len}} {job.seq_len}:\n  "
                        + "\n  ".join(shortfall(spec, t, job) for t in failed))
    warnings = [f"left out {t.node_type.count} node(s) of {shortfall(spec, t, job)}" for t in failed]
    samples, batch_warnings = distribute(job, usable)
    warnings += batch_warnings + pacing_warnings(job, usable, samples)
    node_plans = tuple(_node_plan(spec, ts, job, n, calibration) for ts, n in zip(usable, samples))
    for ts, node_plan in zip(usable, node_plans):
        check_host_ram(ts.node_type, node_plan)
    summary = dict(spec.summary())
    if not job.full_finetune:
        summary["lora_params"] = spec.lora_params(job.lora_rank, job.lora_targets)
        summary["lora_targets"] = list(spec.resolve_targets(job.lora_targets))
    return TrainingPlan(model=spec.name, model_summary=summary, job=job, node_plans=node_plans,
                        workers=_workers(node_plans), warnings=tuple(warnings))
