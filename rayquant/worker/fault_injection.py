"""Test-only fault injection: one rank raises once at a given step, so the end-to-end test sees Ray
Train restart the workers and resume from the last checkpoint.

Slated for removal (user callbacks and real process kills will replace it). Until then it stays out
of the WorkerConfig: the driver turns its own RAYQUANT_FAIL_AT_STEP / RAYQUANT_FAIL_RANK into one
variable of the workers' runtime environment, and the worker adds the callback when it is set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FAIL_AT_STEP_ENV = "RAYQUANT_FAIL_AT_STEP"  # set on the driver by the test
FAIL_RANK_ENV = "RAYQUANT_FAIL_RANK"  # default: the last rank
# What the workers get: set only in their runtime environment, never in a process's own, so a run
# does not inherit it from an earlier run's Ray session.
WORKER_ENV = "RAYQUANT_FAULT_INJECTION"
MARKER = ".rayquant-fault-injected"  # in the run directory: the failure happened (it happens once)
FAIL_MESSAGE = "rayquant fault injection"


def worker_env(run_dir: Path, num_workers: int) -> dict[str, str]:
    """On the driver: the workers' variable when the driver's environment asks for a failure, else {}."""
    step = int(os.environ.get(FAIL_AT_STEP_ENV, "0") or 0)
    if not step:
        return {}
    rank = int(os.environ.get(FAIL_RANK_ENV, num_workers - 1))
    return {WORKER_ENV: json.dumps({"step": step, "rank": rank, "marker": str(run_dir / MARKER)})}


def callbacks(rank: int) -> list:
    """In a worker: the TrainerCallback that fails this rank once, if asked of it; else none."""
    raw = os.environ.get(WORKER_ENV)
    if not raw:
        return []
    spec = json.loads(raw)
    if spec["rank"] != rank:
        return []
    from transformers import TrainerCallback

    class FailOnce(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marker = Path(spec["marker"])
            if state.global_step == spec["step"] and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"rank {rank} failed at step {state.global_step}\n")
                raise RuntimeError(f"{FAIL_MESSAGE} at step {state.global_step} on rank {rank}")

    return [FailOnce()]
