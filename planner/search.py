"""Plan search: per node type the quantization, micro-batch, accumulation, optimizer, checkpointing
and placement that fit its GPUs with the safety margin, and the worker ranks.

Identical nodes are grouped (a NodeType), so the search costs the same for 1 node or 1,000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from planner.calibration import Calibration, calibrated_peak_bytes
from planner.hardware import GIB, GpuSpec, NodeType, fp8_path_for
from planner.layermap import bytes_per_gpu, layer_device_map
from planner.memory import MemoryEstimate, budget_bytes, estimate_memory, max_seq_len
from planner.model import load_model_spec
from planner.architecture import ModelSpec
from planner.plan import JobSpec, NodePlan, PlanError, TrainingPlan, WorkerAssignment
from planner.throughput import tokens_per_second
from planner.vocab import OPTIMIZERS

MAX_MICRO_BATCH = 64
# A global batch other than the one asked for is used only when it makes the step this much faster.
EXACT_BATCH_SLOWDOWN = 1.25
MAX_BATCH_OVERSHOOT = 0.125  # ... and is at most this much larger (unless no exact split exists)
# Warn when leaving a node type out would make the job this much faster.
PACING_WARNING = 1.5
_PRECISION_RANK = {"bf16": 0, "fp16": 0, "fp8": 1, "dynamic-4bit": 2, "nf4": 3}


@dataclass(frozen=True)
class _Config:
    quantization: str
    optimizer: str
    checkpointing: str
    micro_batch: int
    placement: str
    backend: str
    estimate: MemoryEstimate
    peak_bytes: int  # on the busiest GPU
    tokens_per_s: float
    device_map: Mapping[str, int] | None = None


@dataclass(frozen=True)
class _TypeSearch:
    """What the search knows about one node type."""

    node_type: NodeType
    budget: int
    quantizations: tuple[str, ...]  # allowed, most precise first
    placement: str
    workers_per_node: int
    best: _Config | None  # fastest config at the largest micro-batch (for the batch shares)
    notes: Mapping[str, str]


def _sixteen(gpu: GpuSpec) -> str:
    return "bf16" if gpu.supports_bf16 else "fp16"


def _fp8_path(gpu: GpuSpec) -> str | None:
    return fp8_path_for(gpu.compute_capability)


def _allowed_quantizations(model: ModelSpec, gpu: GpuSpec, job: JobSpec) -> tuple[tuple[str, ...], dict]:
    notes: dict[str, str] = {}
    if job.quantization is not None:
        q = job.quantization
        if q == "fp8" and (_fp8_path(gpu) is None or gpu.is_cpu):
            raise PlanError(f"quantization=fp8 is pinned but {gpu.name} (compute capability "
                            f"{gpu.compute_capability_str}) has no FP8 tensor cores. To fix: pin "
                            "dynamic-4bit or bf16 there, or leave quantization to the planner.")
        if q == "bf16" and not gpu.supports_bf16:
            notes["quantization"] = f"bf16 pinned, but {gpu.name} has no bf16: fp16 compute"
            q = "fp16"
        if job.full_finetune and q not in ("bf16", "fp16"):
            raise PlanError(f"quantization={q} is pinned with full fine-tuning, which needs 16-bit "
                            "weights. To fix: pin bf16, or train LoRA adapters.")
        return (q,), notes
    if job.full_finetune:
        return (_sixteen(gpu),), notes
    if model.prequantized == "bnb-4bit":
        notes["quantization"] = f"{model.name} is a pre-quantized bitsandbytes 4-bit checkpoint"
        return ("nf4",), notes
    out = [_sixteen(gpu)]
    path = _fp8_path(gpu)
    if not gpu.is_cpu and (path == "unsloth" or (path == "rowwise" and job.prefer == "speed")):
        out.append("fp8")
    out.append("dynamic-4bit")
    return tuple(out), notes


def _micro_batches(job: JobSpec) -> tuple[int, ...]:
    if job.micro_batch_size is not None:
        return (job.micro_batch_size,)
    return tuple(2**i for i in range(int(math.log2(MAX_MICRO_BATCH)) + 1))


def _checkpointing_modes(job: JobSpec, backend: str) -> tuple[str, ...]:
    if job.gradient_checkpointing is not None:
        return (job.gradient_checkpointing,)
    return ("none", backend)


def _evaluate(model: ModelSpec, nt: NodeType, job: JobSpec, budget: int, quantization: str,
              optimizer: str, ckpt: str, micro: int, placement: str,
              calibration: Calibration) -> _Config | None:
    """One configuration: its estimate and throughput if it fits, else None."""
    gpu = nt.gpu
    backend = "hf" if placement == "zero3" else job.backend
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
    tps = tokens_per_second(model, gpu, quantization=quantization, seq_len=job.seq_len,
                            micro_batch_size=micro, lora_rank=job.lora_rank,
                            lora_targets=job.lora_targets, full_finetune=job.full_finetune,
                            gradient_checkpointing=ckpt, num_shards=shards)
    tps *= calibration.throughput_factor(gpu.name, quantization)
    return _Config(quantization, optimizer, ckpt, micro, placement, backend, est, peak, tps, device_map)


def _better(a: _Config | None, b: _Config | None, job: JobSpec) -> bool:
    """Is a better than b? Faster wins; ties go to more precision, the exact optimizer, less
    recomputation."""
    if a is None:
        return False
    if b is None:
        return True
    if job.prefer == "accuracy" and _PRECISION_RANK[a.quantization] != _PRECISION_RANK[b.quantization]:
        return _PRECISION_RANK[a.quantization] < _PRECISION_RANK[b.quantization]
    if not math.isclose(a.tokens_per_s, b.tokens_per_s, rel_tol=1e-9):
        return a.tokens_per_s > b.tokens_per_s
    key = lambda c: (_PRECISION_RANK[c.quantization], OPTIMIZERS.index(c.optimizer),
                     c.checkpointing != "none", -c.micro_batch)
    return key(a) < key(b)


def _best(model, nt, job, budget, quantizations, placement, micro_batches, calibration) -> _Config | None:
    """The best configuration over quantizations, optimizers, checkpointing and `micro_batches`."""
    optimizers = (job.optimizer,) if job.optimizer else OPTIMIZERS
    modes = _checkpointing_modes(job, "hf" if placement == "zero3" else job.backend)
    best = None
    for q in quantizations:
        for opt in optimizers:
            for ckpt in modes:
                # Memory grows with the micro-batch: scan from the largest down to the first fit
                # (throughput grows with it too, so smaller ones that fit are never better).
                for m in sorted(micro_batches, reverse=True):
                    c = _evaluate(model, nt, job, budget, q, opt, ckpt, m, placement, calibration)
                    if c is not None:
                        if _better(c, best, job):
                            best = c
                        break
    return best


def _search_type(model, nt: NodeType, job: JobSpec, calibration) -> _TypeSearch:
    budget = budget_bytes(nt.gpu.memory_bytes, job.safety_margin)
    quants, notes = _allowed_quantizations(model, nt.gpu, job)
    placements = [("per-gpu", nt.gpus_per_node)]
    if nt.gpus_per_node > 1:
        placements.append(("node-spanning", 1))
    if nt.num_gpus > 1:
        placements.append(("zero3", nt.gpus_per_node))
    for placement, workers_per_node in placements:
        q = quants if placement != "zero3" else tuple(x for x in quants if x in ("bf16", "fp16")) \
            or (_sixteen(nt.gpu),)
        best = _best(model, nt, job, budget, q, placement, _micro_batches(job), calibration)
        if best is not None:
            return _TypeSearch(nt, budget, q, placement, workers_per_node, best, notes)
    return _TypeSearch(nt, budget, quants, "per-gpu", nt.gpus_per_node, None, notes)


def _shortfall(model: ModelSpec, ts: _TypeSearch, job: JobSpec) -> str:
    """Per node type: how much memory is missing and what would fix it."""
    nt, gpu = ts.node_type, ts.node_type.gpu
    micro = job.micro_batch_size or 1
    best = None
    quant = ts.quantizations[-1]
    modes = _checkpointing_modes(job, job.backend)
    ckpt = "hf" if "hf" in modes else modes[-1]
    opt = job.optimizer or "adamw_8bit"
    kw = dict(quantization=quant, double_quant=job.double_quant, backend=job.backend,
              micro_batch_size=micro, lora_rank=job.lora_rank, lora_targets=job.lora_targets,
              full_finetune=job.full_finetune, gradient_checkpointing=ckpt, optimizer=opt)
    est = estimate_memory(model, gpu, seq_len=job.seq_len, **kw)
    best = est.peak_bytes
    missing = best - ts.budget
    need_gib = best / (1.0 - job.safety_margin) / GIB
    fixes = []
    fits_len = max_seq_len(model, gpu, safety_margin=job.safety_margin, **kw)
    if fits_len > 0:
        fixes.append(f"shorter sequences (--seq-len {fits_len} fits)")
    if quant in ("bf16", "fp16") and not job.full_finetune:
        fixes.append("4-bit (--quantization dynamic-4bit)")
    if job.full_finetune:
        fixes.append("LoRA instead of full fine-tuning")
    elif len(job.lora_targets) > 2 or "all" in job.lora_targets:
        fixes.append("fewer LoRA targets (--lora-targets q_proj,v_proj)")
    fixes.append(f"a GPU with at least {math.ceil(need_gib)} GiB")
    return (f"{nt.key} ({gpu.memory_gib:.0f} GiB GPUs): the smallest configuration ({quant}, "
            f"micro-batch {micro}, {ckpt} checkpointing, {opt}) needs {best / GIB:.1f} GiB per GPU, "
            f"{missing / GIB:.1f} GiB more than the {ts.budget / GIB:.1f} GiB budget "
            f"({job.safety_margin:.0%} margin). To fix: " + ", or ".join(fixes))


def _totals(coins: Sequence[int], counts: Sequence[int], cap: int) -> list[int]:
    """Bitsets of the global batches reachable by the first j types (j = 0..N), each type i taking
    between 1 and counts[i] grains per worker (coins[i] sequences per grain over all its workers).
    Bounded knapsack with binary splitting of the counts, on Python ints as bitsets."""
    mask = (1 << (cap + 1)) - 1
    stages = [1]
    for coin, count in zip(coins, counts):
        bits = (stages[-1] << coin) & mask  # every worker takes at least one grain
        left, chunk = count - 1, 1
        while left > 0:
            take = min(chunk, left)
            bits |= (bits << (coin * take)) & mask
            left -= take
            chunk *= 2
        stages.append(bits)
    return stages


def _distribute(job: JobSpec, types: Sequence[_TypeSearch]) -> tuple[list[int], list[str]]:
    """Samples per optimizer step for one worker of each type.

    The split minimises the step time (the slowest worker paces every synchronous step), so shares
    follow each worker's predicted speed. It meets the global batch exactly where the worker counts
    allow, unless a batch at most MAX_BATCH_OVERSHOOT larger makes the step EXACT_BATCH_SLOWDOWN
    faster (16 fast + 4 slow workers and 64 sequences split exactly only as 3 + 4 each), and else
    takes the nearest larger batch; either way with a warning.
    """
    G = job.global_batch_size
    W = [t.node_type.count * t.workers_per_node for t in types]
    grain = job.micro_batch_size or 1
    rates = [t.best.tokens_per_s for t in types]
    coins = [w * grain for w in W]
    smallest = sum(coins)
    if smallest >= G:  # one grain per worker already meets the batch
        warnings = [] if smallest == G else [
            f"global batch {G} is smaller than the workers can take ({sum(W)} workers, at least "
            f"{grain} sequence(s) each): the plan uses {smallest}"]
        return [grain] * len(types), warnings
    cap = max(math.floor(G * (1 + MAX_BATCH_OVERSHOOT)), G + max(coins))

    def counts(tau: float) -> list[int]:
        """Grains per worker that fit in a step of `tau` (seconds per token of each worker's rate,
        the same scale for all); 0 where not even one grain fits."""
        return [min(math.floor(tau * r / grain * (1 + 1e-9)), cap // c) for r, c in zip(rates, coins)]

    def reachable(tau: float) -> int:
        bound = counts(tau)
        return _totals(coins, bound, cap)[-1] if min(bound) >= 1 else 0

    def fastest(accept) -> tuple[float, int] | None:
        """The shortest step for which some reachable batch passes `accept`, and that batch."""
        lo, hi = max(grain / r for r in rates) * 0.999, max(cap // c * grain / r for c, r in zip(coins, rates))
        found = accept(reachable(hi))
        if found is None:
            return None
        for _ in range(48):
            mid = (lo + hi) / 2
            total = accept(reachable(mid))
            if total is None:
                lo = mid
            else:
                hi, found = mid, total
        return hi, found

    def first_at_least(limit: int):
        return lambda bits: next((t for t in range(G, limit + 1) if bits >> t & 1), None)

    # The batch to aim for: G itself, else the nearest larger one the worker counts can make.
    at_most = reachable(max(cap // c * grain / r for c, r in zip(coins, rates)))
    aim = next(t for t in range(G, cap + 1) if at_most >> t & 1)
    ref = fastest(lambda bits: aim if bits >> aim & 1 else None)
    # A batch up to MAX_BATCH_OVERSHOOT larger is taken only when its step is much shorter.
    alt = fastest(first_at_least(max(aim, math.floor(G * (1 + MAX_BATCH_OVERSHOOT))))) or ref
    listing = ", ".join(f"{w} x {t.node_type.key}" for w, t in zip(W, types))
    warnings: list[str] = []
    if aim != G:
        warnings.append(f"global batch {G} cannot be split evenly over these workers ({listing}); "
                        f"the nearest larger batch is {aim}")
    tau, total = ref
    if ref[1] / ref[0] * EXACT_BATCH_SLOWDOWN < alt[1] / alt[0]:
        tau, total = alt
        warnings.append(f"a batch of {aim} gives slow workers more than their speed's share (step "
                        f"{ref[0] / alt[0]:.1f}x longer than with {total}): the plan uses {total}")
    # Recover one split of `total` within the step: the last types (in input order) first.
    bound = counts(tau)
    stages = _totals(coins, bound, cap)
    split = [0] * len(types)
    for i in reversed(range(len(types))):
        k = next(k for k in range(bound[i], 0, -1)
                 if total - coins[i] * k >= 0 and stages[i] >> (total - coins[i] * k) & 1)
        split[i] = k * grain
        total -= coins[i] * k
    return split, warnings


def _throughput(job: JobSpec, types: Sequence[_TypeSearch], samples: Sequence[int]) -> float:
    """Cluster tokens/s: the global batch over the slowest worker's step."""
    total = sum(t.node_type.count * t.workers_per_node * n for t, n in zip(types, samples))
    return total * job.seq_len / max(n * job.seq_len / t.best.tokens_per_s for t, n in zip(types, samples))


def _pacing_warnings(job: JobSpec, types: Sequence[_TypeSearch], samples: Sequence[int]) -> list[str]:
    """Say when the slowest node types, even at their smallest share, pace every step so much that
    the job would be faster without them, so the user can leave them out or raise the batch."""
    if len(types) < 2:
        return []
    with_all = _throughput(job, types, samples)
    by_speed = sorted(types, key=lambda t: -t.best.tokens_per_s)
    best_k, best = len(types), with_all
    for k in range(1, len(types)):  # keep the k fastest types
        kept = by_speed[:k]
        rate = _throughput(job, kept, _distribute(job, kept)[0])
        if rate > best:
            best_k, best = k, rate
    if best < PACING_WARNING * with_all:
        return []
    slow = by_speed[best_k:]
    fewest = min(n for t, n in zip(types, samples) if t in slow)
    pays_off = math.ceil(fewest * sum(t.node_type.count * t.workers_per_node * t.best.tokens_per_s
                                      for t in types) / min(t.best.tokens_per_s for t in slow))
    return [f"the slowest node types pace every step even at their smallest share: without "
            f"{', '.join(t.node_type.key for t in slow)} the job would run about {best / with_all:.1f}x "
            f"faster. To fix: leave them out of --gpus, or raise "
            f"--global-batch toward {pays_off} so their shares match their speed"]


def _divisors(n: int, cap: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _reasons(model: ModelSpec, ts: _TypeSearch, cfg: _Config, job: JobSpec, accum: int,
             samples: int) -> dict[str, str]:
    gpu = ts.node_type.gpu
    q = cfg.quantization
    r: dict[str, str] = {}
    if job.quantization:
        r["quantization"] = f"pinned to {q}" + (
            f" (FP8 via {'Unsloth load_in_fp8' if _fp8_path(gpu) == 'unsloth' else 'rayquant row-wise FP8 linear'})"
            if q == "fp8" else "")
    elif q == "fp8":
        path = _fp8_path(gpu)
        r["quantization"] = (f"FP8 on compute capability {gpu.compute_capability_str} via " + (
            "Unsloth load_in_fp8" if path == "unsloth" else
            "rayquant's row-wise FP8 linear (Unsloth's FP8 path needs cc 9.x)") +
            f": fastest that fits ({cfg.tokens_per_s:,.0f} tok/s)")
    elif q in ("bf16", "fp16"):
        why = "full fine-tuning needs 16-bit weights" if job.full_finetune else (
            "most accurate and it fits" if job.prefer == "accuracy" else
            "fits with room to spare and needs no dequantization: fastest")
        r["quantization"] = f"{q} weights ({why})" + ("" if gpu.supports_bf16 else
                                                      f"; {gpu.name} has no bf16, so fp16 compute")
    elif q == "dynamic-4bit":
        others = [x for x in ts.quantizations if x != q]
        r["quantization"] = ("dynamic 4-bit (NF4 + double quant, sensitive modules kept 16-bit "
                             "within the spare memory)" + (f": {', '.join(others)} does not fit or is slower"
                                                           if others else ""))
    else:
        r["quantization"] = f"{q}: 4-bit NF4 weights as stored"
    if ts.notes.get("quantization"):
        r["quantization"] = ts.notes["quantization"] + "; " + r["quantization"]
    r["micro_batch_size"] = (f"pinned to {cfg.micro_batch}" if job.micro_batch_size else
                             f"largest divisor of this worker's {samples} samples per step that fits "
                             f"(peak {cfg.peak_bytes / GIB:.1f} of {ts.budget / GIB:.1f} GiB budget)")
    r["gradient_accumulation_steps"] = (f"{accum} x {cfg.micro_batch} = {samples} samples per step, "
                                        "its share of the global batch by predicted speed")
    r["optimizer"] = (f"pinned to {cfg.optimizer}" if job.optimizer else
                      "adamw_torch fits: exact fp32 states" if cfg.optimizer == "adamw_torch" else
                      f"{cfg.optimizer}: 32-bit AdamW states do not fit as well (memory is tight)")
    r["gradient_checkpointing"] = (f"pinned to {cfg.checkpointing}" if job.gradient_checkpointing else
                                   "none: activations fit, no recomputation" if cfg.checkpointing == "none" else
                                   f"{cfg.checkpointing}: activations of every layer do not fit; "
                                   "recompute (+~33% compute)" + (", layer inputs offloaded to host RAM"
                                                                  if cfg.checkpointing == "unsloth" else ""))
    r["placement"] = {
        "per-gpu": "one worker per GPU (DDP): the model fits one GPU",
        "node-spanning": f"one worker spans the node's {ts.node_type.gpus_per_node} GPUs with a "
                         "layer map: one GPU cannot hold the model",
        "zero3": f"ZeRO-3 over {ts.node_type.num_gpus} GPUs (hf backend): not even a node's GPUs "
                 "hold the model",
    }[cfg.placement]
    r["safety_margin"] = f"{job.safety_margin:.0%} of {gpu.memory_gib:.1f} GiB kept free"
    return r


def make_plan(model: ModelSpec | str, node_types: Sequence[NodeType], job: JobSpec,
              calibration: Calibration | None = None) -> TrainingPlan:
    """Plan a job on an inventory.

    `calibration` (from `rayquant calibrate`) scales predicted peak memory (its allocator part) by
    memory_factor(gpu, quantization) before the budget check, and tokens/s by
    throughput_factor(gpu, quantization); None uses the models as they are."""
    spec = load_model_spec(model) if isinstance(model, str) else model
    if not node_types:
        raise PlanError("the inventory is empty. To fix: pass --gpus like 2x8xH100-80GB,4x1xA10G")
    if not job.full_finetune:
        spec.resolve_targets(job.lora_targets)  # fail early on unknown targets
    calibration = calibration or Calibration(measurements=())
    searched = [_search_type(spec, nt, job, calibration) for nt in node_types]
    usable = [t for t in searched if t.best is not None]
    failed = [t for t in searched if t.best is None]
    if not usable:
        raise PlanError(f"{spec.name} does not fit any node type at seq_len {job.seq_len}:\n  "
                        + "\n  ".join(_shortfall(spec, t, job) for t in failed))
    warnings = [f"left out {t.node_type.count} node(s) of {_shortfall(spec, t, job)}" for t in failed]
    samples, batch_warnings = _distribute(job, usable)
    warnings += batch_warnings + _pacing_warnings(job, usable, samples)

    node_plans: list[NodePlan] = []
    workers: list[WorkerAssignment] = []
    for ts, n in zip(usable, samples):
        nt = ts.node_type
        micro = _divisors(n, MAX_MICRO_BATCH) if job.micro_batch_size is None else (job.micro_batch_size,)
        cfg = _best(spec, nt, job, ts.budget, ts.quantizations, ts.placement, micro, calibration)
        if cfg is None:  # the largest divisor exceeded what fits; the share search used a fitting size
            cfg = ts.best
            n = cfg.micro_batch * max(1, round(n / cfg.micro_batch))
        accum = n // cfg.micro_batch
        protected = max(0, ts.budget - cfg.peak_bytes) if cfg.quantization == "dynamic-4bit" else 0
        node_plans.append(NodePlan(
            node_type=nt.key, gpu=nt.gpu.name, nodes=nt.count, gpus_per_node=nt.gpus_per_node,
            quantization=cfg.quantization,
            compute_dtype="bfloat16" if nt.gpu.supports_bf16 or nt.gpu.is_cpu else "float16",
            micro_batch_size=cfg.micro_batch, gradient_accumulation_steps=accum,
            optimizer=cfg.optimizer, gradient_checkpointing=cfg.checkpointing,
            placement=cfg.placement, backend=cfg.backend, workers_per_node=ts.workers_per_node,
            gpus_per_worker=nt.gpus_per_node if cfg.placement == "node-spanning" else 1,
            peak_memory_bytes=cfg.peak_bytes, memory_budget_bytes=ts.budget,
            breakdown=cfg.estimate.breakdown, tokens_per_second=cfg.tokens_per_s,
            reasons=_reasons(spec, ts, cfg, job, accum, n), double_quant=job.double_quant,
            fp8_path=_fp8_path(nt.gpu) if cfg.quantization == "fp8" else None,
            protected_budget_bytes=protected, device_map=cfg.device_map,
            host_memory_bytes=cfg.estimate.host_bytes))
    rank = 0
    for plan in node_plans:
        for node in range(plan.nodes):
            for local in range(plan.workers_per_node):
                workers.append(WorkerAssignment(rank=rank, node_type=plan.node_type,
                                                node_index=node, local_rank=local))
                rank += 1
    summary = dict(spec.summary())
    if not job.full_finetune:
        summary["lora_params"] = spec.lora_params(job.lora_rank, job.lora_targets)
        summary["lora_targets"] = list(spec.resolve_targets(job.lora_targets))
    return TrainingPlan(model=spec.name, model_summary=summary, job=job,
                        node_plans=tuple(node_plans), workers=tuple(workers),
                        warnings=tuple(warnings))
