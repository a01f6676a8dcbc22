"""Candidate configurations of one node type: each one's memory and speed, and the best that fits.

Identical nodes are grouped (a NodeType), so the search costs the same for 1 node or 1,000.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from planner.architecture import ModelSpec
from planner.calibration import Calibration, calibrated_peak_bytes
from planner.hardware import NodeType
from planner.layermap import bytes_per_gpu, layer_device_map
from planner.memory import MemoryEstimate, budget_bytes, estimate_memory
from planner.plan import JobSpec, PlanError
from planner.search.policy import (allowed_quantizations, backend_for, better, checkpointing_modes,
                                   micro_batches, placement_quantizations, placements)
from planner.throughput import NETWORK_GB_PER_S, tokens_per_second
from planner.vocab import OPTIMIZERS


@dataclass(frozen=True)
class Candidate:
    """One configuration that fits a node type's budget."""

    quantization: str
    optimizer: str
    checkpointing: str
    micro_batch: int
    placement: str
    backend: str
    estimate: MemoryEstimate
    peak_bytes: int  # on the busiest GPU, calibrated
    tokens_per_s: float  # calibrated
    device_map: Mapping[str, int] | None = None


@dataclass(frozen=True)
class TypeSearch:
    """What the search knows about one node type."""

    node_type: NodeType
    budget: int
    quantizations: tuple[str, ...]  # allowed, most precise first
    placement: str
    workers_per_node: int
    best: Candidate | None  # fastest config at the largest micro-batch (for the batch shares)
    notes: Mapping[str, str]
    # The best configuration at each micro-batch the search tries (powers of two, or the pinned one)
    # that fits: a worker taking n samples per step runs the best of those dividing n.
    by_micro: Mapping[int, Candidate] = field(default_factory=dict)


def evaluate(model: ModelSpec, nt: NodeType, job: JobSpec, budget: int, quantization: str,
             optimizer: str, ckpt: str, micro: int, placement: str,
             calibration: Calibration) -> Candidate | None:
    """One configuration: its estimate and throughput if it fits, else None."""
    gpu = nt.gpu
    backend = backend_for(placement, job)
    shards = nt.num_gpus if placement == "zero3" else 1
    if ckpt == "unsloth" and backend == "hf":
        return None
    est = estimate_memory(model, gpu, quantization=quantization, double_quant=job.double_quant,
                          backend=backend, seq_len=job.seq_len, micro_batch_size=micro,
                          lora_rank=job.lora_rank, lora_targets=job.lora_targets,
                          full_finetune=job.full_finetune, gradient_checkpointing=ckpt,
                          optimizer=optimizer, num_shards=shards)
    device_map = None
    peak = est.peak_bytes
    if placement == "node-spanning":
        # Transients (context, working set, one recomputed layer) can land on any GPU: reserve
        # them on each; the modules are split by the layer map.
        reserve = est.peak_bytes - sum(est.module_bytes.values())
        try:
            device_map = layer_device_map(model, est.module_bytes, [budget - reserve] * nt.gpus_per_node)
        except PlanError:
            return None
        peak = reserve + max(bytes_per_gpu(device_map, est.module_bytes, nt.gpus_per_node))
    # Calibrated before the budget check, so a measured excess shrinks the plan.
    peak = calibrated_peak_bytes(est, calibration.memory_factor(gpu.name, quantization), peak)
    if peak > budget:
        return None
    # Data-parallel workers of this type all-reduce their adapters' gradients (ZeRO-3 counts its
    # own traffic); over the cluster network once they span nodes.
    workers = 1 if placement == "zero3" else nt.count * (nt.gpus_per_node if placement == "per-gpu" else 1)
    tps = tokens_per_second(model, gpu, quantization=quantization, seq_len=job.seq_len,
                            micro_batch_size=micro, lora_rank=job.lora_rank,
                            lora_targets=job.lora_targets, full_finetune=job.full_finetune,
                            gradient_checkpointing=ckpt, num_shards=shards, backend=backend,
                            optimizer=optimizer, data_parallel=workers,
                            network_gb_per_s=NETWORK_GB_PER_S if nt.count > 1 else None)
    tps *= calibration.throughput_factor(gpu.name, quantization)
    return Candidate(quantization, optimizer, ckpt, micro, placement, backend, est, peak, tps, device_map)


def best_candidate(model: ModelSpec, nt: NodeType, job: JobSpec, budget: int,
                   quantizations: Sequence[str], placement: str, micro: Sequence[int],
                   calibration: Calibration) -> Candidate | None:
    """The best configuration over quantizations, optimizers, checkpointing and the `micro` batches."""
    optimizers = (job.optimizer,) if job.optimizer else OPTIMIZERS
    best = None
    for q in quantizations:
        for opt in optimizers:
            for ckpt in checkpointing_modes(job, backend_for(placement, job)):
                # Memory grows with the micro-batch: scan from the largest down to the first fit
                # (throughput grows with it too, so smaller ones that fit are never better).
                for m in sorted(micro, reverse=True):
                    c = evaluate(model, nt, job, budget, q, opt, ckpt, m, placement, calibration)
                    if c is not None:
                        if better(c, best, job):
                            best = c
                        break
    return best


def search_type(model: ModelSpec, nt: NodeType, job: JobSpec, calibration: Calibration) -> TypeSearch:
    """The first placement (policy order) where some configuration fits, and its best one; `best`
    is None when nothing fits anywhere."""
    budget = budget_bytes(nt.gpu.memory_bytes, job.safety_margin)
    quants, notes = allowed_quantizations(model, nt.gpu, job)
    for placement, workers_per_node in placements(nt):
        q = placement_quantizations(quants, placement)
        best = best_candidate(model, nt, job, budget, q, placement, micro_batches(job), calibration)
        if best is not None:
            by_micro = {m: c for m in micro_batches(job)
                        if (c := best_candidate(model, nt, job, budget, q, placement, (m,), calibration))}
            return TypeSearch(nt, budget, q, placement, workers_per_node, best, notes, by_micro)
    return TypeSearch(nt, budget, quants, "per-gpu", nt.gpus_per_node, None, notes)
