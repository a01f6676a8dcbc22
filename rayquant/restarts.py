"""What a run survives, on the driver: why a Ray Train attempt failed, and the record of each restart.

RayQuantTrainer.fit runs Ray Train attempts in a loop (Ray Train's own retry is off, so an
out-of-memory error is never retried with the plan that ran out). After a failed attempt,
`classify` names the cause from the ranks' exceptions and the cluster:

    out_of_memory  a rank raised torch.OutOfMemoryError (loading, forward, backward, optimizer):
                   its node type is re-planned one rung cheaper (planner.replan); run.max_replans
    node_lost      a node the run used left the Ray cluster: re-planned on the nodes left (fewer
                   workers, the same global batch through accumulation); run.max_replans
    worker_died    a worker process died (SIGKILL, the OOM killer) on a node still there: the same
                   plan again; run.max_failures
    worker_error   a rank raised another exception: the same plan again; run.max_failures

Every restart resumes from the run's last checkpoint (Ray Train restores it: the same run name and
storage) in fresh worker processes, and is printed as a progress line and kept in the manifest's
`run.restarts`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from rayquant.contract import OutOfMemoryReport, WorkerOutOfMemory

CAUSES = ("out_of_memory", "node_lost", "worker_died", "worker_error")
REPLANNED = ("out_of_memory", "node_lost")  # counted against run.max_replans; the rest run.max_failures
CAUSE_WORDS = {"out_of_memory": "out of memory", "node_lost": "node lost", "worker_died": "worker died",
               "worker_error": "worker error"}
# The driver's record of the last step the workers reported (written by rayquant.progress).
PROGRESS_FILE = "rayquant_progress.json"


@dataclass(frozen=True)
class Fault:
    """Why one Ray Train attempt failed."""

    cause: str  # one of CAUSES
    rank: int | None
    node_type: str | None
    message: str  # the failing rank's exception, one line
    out_of_memory: OutOfMemoryReport | None = None
    lost: Mapping[str, int] = field(default_factory=dict)  # node type -> nodes that left


@dataclass(frozen=True)
class Restart:
    """One restart, as the manifest's `run.restarts` keeps it."""

    at_step: int | None  # the last step the run reached before the fault (None: before step 1)
    cause: str
    node_type: str | None
    before: Mapping[str, Any]  # the settings that changed, before and after (empty: none changed)
    after: Mapping[str, Any]
    resumed_from_step: int  # the checkpoint's step (0: from the start)
    rank: int | None = None
    memory_seen_bytes: int | None = None  # out_of_memory: what the rank held when it failed
    calibration_file: str | None = None  # out_of_memory: where the measured peak was written

    def to_manifest(self) -> dict[str, Any]:
        out = {"at_step": self.at_step, "cause": self.cause, "node_type": self.node_type,
               "before": dict(self.before), "after": dict(self.after),
               "resumed_from_step": self.resumed_from_step, "rank": self.rank}
        if self.memory_seen_bytes is not None:
            out["memory_seen_bytes"] = self.memory_seen_bytes
        if self.calibration_file is not None:
            out["calibration_file"] = self.calibration_file
        return out


def worker_exceptions(error: BaseException) -> dict[int, BaseException]:
    """Rank -> the exception it failed with, unwrapped from Ray Train's wrappers; {} when `error`
    is not Ray Train's report of failed workers."""
    failures = getattr(error, "worker_failures", None)
    if not isinstance(failures, Mapping):
        return {}
    out = {}
    for rank, exc in failures.items():
        # UserExceptionWithTraceback (the train function raised) and WorkerHealthCheckFailedError
        # (the worker's process is gone) wrap the real exception.
        inner = getattr(exc, "_base_exc", None) or getattr(exc, "health_check_failure", None)
        out[int(rank)] = inner if isinstance(inner, BaseException) else exc
    return out


def process_died(exc: BaseException) -> bool:
    """Whether a rank's failure is its process (or its node) going away, not an exception it raised."""
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)


def out_of_memory_report(exc: BaseException) -> OutOfMemoryReport | None:
    """The report of a rank that ran out of memory (rayquant.worker.oom), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, WorkerOutOfMemory):
            return exc.report
        exc = exc.__cause__ or exc.__context__
    return None


def classify(error: BaseException, plan, lost: Mapping[str, int]) -> Fault | None:
    """The cause of a failed attempt of `plan`; None when `error` is not a failure of its workers
    (Ray Train's controller, a bug: the caller re-raises it). `lost`: node type -> nodes of the
    plan that left the cluster (rayquant.trainer looks when a process died)."""
    failures = worker_exceptions(error)
    if not failures:
        return None
    for rank, exc in sorted(failures.items()):
        report = out_of_memory_report(exc)
        if report is not None:
            return Fault("out_of_memory", rank, report.node_type, report.message, out_of_memory=report)
    if lost:
        node_type = next(iter(lost))
        ranks = [w.rank for w in plan.workers if w.node_type == node_type]
        return Fault("node_lost", ranks[0] if ranks else None, node_type,
                     ", ".join(f"{n} node(s) of {t} left the cluster" for t, n in lost.items()), lost=lost)
    # A rank that died is the cause; the others fail after it (a collective with a dead peer).
    died = [r for r, e in sorted(failures.items()) if process_died(e)]
    rank = died[0] if died else min(failures)
    node_type = plan.workers[rank].node_type if rank < len(plan.workers) else None
    message = (str(failures[rank]).strip().splitlines() or [type(failures[rank]).__name__])[-1][:300]
    return Fault("worker_died" if died else "worker_error", rank, node_type, message)


def last_checkpoint_step(run_dir: Path) -> int:
    """The global step of the last checkpoint Ray Train registered for the run (what a restart
    resumes from; 0: none). A checkpoint the workers wrote but Ray Train never registered (the
    run failed first) is not one."""
    try:
        return int(json.loads((Path(run_dir) / PROGRESS_FILE).read_text()).get("checkpoint_step", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def reached_step(run_dir: Path) -> int | None:
    """The last step the workers reported to the driver (rayquant.progress writes it)."""
    try:
        return int(json.loads((Path(run_dir) / PROGRESS_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def restart_line(number: int, restart: Restart, summary: str, fault: Fault) -> str:
    """`[rayquant] restart 1: out of memory on node type CPU:2 (rank 1) at step 12; micro-batch 4 -> 2,
    accumulation 1 -> 2; resuming from step 10`."""
    where = f" on node type {restart.node_type}" if restart.node_type else ""
    who = f" (rank {restart.rank})" if restart.rank is not None and fault.cause != "node_lost" else ""
    at = f" at step {restart.at_step}" if restart.at_step is not None else " before the first step"
    what = CAUSE_WORDS[fault.cause]
    if fault.cause == "node_lost":
        what += " (" + ", ".join(f"{n} of {t}" for t, n in fault.lost.items()) + ")"
    if fault.cause == "out_of_memory" and restart.memory_seen_bytes:
        what += f" ({restart.memory_seen_bytes / 2**30:.2f} GiB in use)"
    changes = summary if restart.before or restart.after else "same plan"
    if fault.cause in ("worker_died", "worker_error"):
        changes += f" ({fault.message})" if fault.message else ""
    resume = (f"resuming from step {restart.resumed_from_step}" if restart.resumed_from_step
              else "starting over (no checkpoint yet)")
    return f"[rayquant] restart {number}: {what}{where}{who}{at}; {changes}; {resume}"
