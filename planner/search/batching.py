"""The global batch over node types: samples per optimizer step for one worker of each type.

Every synchronous step waits for the slowest worker, so the split follows each worker's predicted
speed; it meets the global batch exactly where the worker counts allow. Pacing warnings say when
slow node types hold the whole job back. Warnings name settings as {placeholders} (planner.vocab).
"""

from __future__ import annotations

import math
from typing import Sequence

from planner.plan import JobSpec
from planner.search.candidates import TypeSearch
from planner.search.policy import better

# A global batch other than the one asked for is used only when it makes the step this much faster.
EXACT_BATCH_SLOWDOWN = 1.25
MAX_BATCH_OVERSHOOT = 0.125  # ... and is at most this much larger (unless no exact split exists)
# Warn when leaving a node type out would make the job this much faster.
PACING_WARNING = 1.5


def worker_rate(t: TypeSearch, n: int, job: JobSpec) -> float | None:
    """Tokens/s of one worker of type `t` taking `n` samples per step: that of the best
    configuration (policy.better) at the micro-batches the search tried that divide `n` (None when
    none does: a pinned micro-batch that does not)."""
    best = None
    for m, c in t.by_micro.items():
        if n % m == 0 and better(c, best, job):
            best = c
    return None if best is None else best.tokens_per_s


def totals(sizes: Sequence[int], allowed: Sequence[Sequence[int]], cap: int) -> list[int]:
    """Bitsets of the global batches reachable by the first j types (j = 0..N), each worker of type i
    taking a count from allowed[i] (sizes[i] workers of that type). Python ints as bitsets."""
    mask = (1 << (cap + 1)) - 1
    stages = [1]
    for size, counts in zip(sizes, allowed):
        prev, bits = stages[-1], 0
        for n in counts:
            bits |= (prev << (size * n)) & mask
        stages.append(bits)
    return stages


def distribute(job: JobSpec, types: Sequence[TypeSearch]) -> tuple[list[int], list[str]]:
    """Samples per optimizer step for one worker of each type.

    The split minimises the step time (the slowest worker paces every synchronous step), so shares
    follow each worker's predicted speed at the micro-batches its share allows (31 samples run as
    one micro-batch of 31 or 31 of one, 32 as 8 x 4: worker_rate). It meets the global batch exactly
    where the worker counts allow, unless a batch at most MAX_BATCH_OVERSHOOT larger makes the step
    EXACT_BATCH_SLOWDOWN faster (16 fast + 4 slow workers and 64 sequences split exactly only as
    3 + 4 each), and else takes the nearest larger batch; either way with a warning.
    """
    G = job.global_batch_size
    W = [t.node_type.count * t.workers_per_node for t in types]
    # Each type's counts up to the cap and their step time (seconds per token of a sequence: the
    # same scale for all types), cheapest count first for the smallest batch.
    least = [min(t.by_micro) for t in types]
    smallest = sum(w * n for w, n in zip(W, least))
    if smallest >= G:  # the smallest count per worker already meets the batch
        warnings = [] if smallest == G else [
            f"global batch {G} is smaller than the workers can take ({sum(W)} workers, at least "
            f"{min(least)} sequence(s) each): the plan uses {smallest}"]
        return least, warnings
    cap = max(math.floor(G * (1 + MAX_BATCH_OVERSHOOT)), G + max(w * n for w, n in zip(W, least)))
    step = [{n: n / r for n in range(1, cap // w + 1) if (r := worker_rate(t, n, job))}
            for t, w in zip(types, W)]
    thresholds = sorted({x for s in step for x in s.values()})

    def allowed(tau: float) -> list[list[int]]:
        return [[n for n, x in s.items() if x <= tau] for s in step]

    def reachable(tau: float) -> int:
        counts = allowed(tau)
        return totals(W, counts, cap)[-1] if all(counts) else 0

    def fastest(accept) -> tuple[float, int] | None:
        """The shortest step for which some reachable batch passes `accept`, and that batch."""
        lo, hi = 0, len(thresholds) - 1
        found = accept(reachable(thresholds[hi]))
        if found is None:
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            total = accept(reachable(thresholds[mid]))
            if total is None:
                lo = mid + 1
            else:
                hi, found = mid, total
        return thresholds[hi], found

    def first_at_least(limit: int):
        return lambda bits: next((t for t in range(G, limit + 1) if bits >> t & 1), None)

    # The batch to aim for: G itself, else the nearest larger one the worker counts can make.
    at_most = reachable(thresholds[-1])
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
    # Recover one split of `total` within the step: the last types (in input order) first, each
    # its largest count that leaves a reachable rest.
    counts = allowed(tau)
    stages = totals(W, counts, cap)
    split = [0] * len(types)
    for i in reversed(range(len(types))):
        n = next(n for n in sorted(counts[i], reverse=True)
                 if total - W[i] * n >= 0 and stages[i] >> (total - W[i] * n) & 1)
        split[i] = n
        total -= W[i] * n
    return split, warnings


def cluster_tokens_per_second(job: JobSpec, types: Sequence[TypeSearch], samples: Sequence[int]) -> float:
    """Cluster tokens/s: the global batch over the slowest worker's step."""
    total = sum(t.node_type.count * t.workers_per_node * n for t, n in zip(types, samples))
    return total * job.seq_len / max(n * job.seq_len / worker_rate(t, n, job) for t, n in zip(types, samples))


def pacing_warnings(job: JobSpec, types: Sequence[TypeSearch], samples: Sequence[int]) -> list[str]:
    """Say when the slowest node types, even at their smallest share, pace every step so much that
    the job would be faster without them, so the user can leave them out or raise the batch."""
    if len(types) < 2:
        return []
    with_all = cluster_tokens_per_second(job, types, samples)
    by_speed = sorted(types, key=lambda t: -t.best.tokens_per_s)
    best_k, best = len(types), with_all
    for k in range(1, len(types)):  # keep the k fastest types
        kept = by_speed[:k]
        rate = cluster_tokens_per_second(job, kept, distribute(job, kept)[0])
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
            f"faster. To fix: leave them out of {{gpus}}, or raise "
            f"{{global_batch_size}} toward {pays_off} so their shares match their speed"]


def divisors(n: int, cap: int) -> tuple[int, ...]:
    """The micro-batches up to `cap` that split a worker's `n` samples per step exactly."""
    return tuple(d for d in range(1, min(n, cap) + 1) if n % d == 0)
