"""Progress lines on the driver's console, from the metrics every worker reports to Ray Train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.train import UserCallback


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def format_progress(step: int, total: int, loss: float | None, tokens_per_s: float, elapsed_s: float) -> str:
    """`step 3/20 (15%)  loss 5.1234  tokens/s 1,234  ETA 0:00:12` (ETA from the mean step time)."""
    pct = 100.0 * step / total if total else 0.0
    eta = format_eta(elapsed_s / step * (total - step)) if step else "?"
    loss_s = f"{loss:.4f}" if loss is not None else "-"
    return (f"[rayquant] step {step}/{total} ({pct:.0f}%)  loss {loss_s}  "
            f"tokens/s {tokens_per_s:,.0f}  ETA {eta}")


def format_eval(step: int, total: int, loss: float, tokens: int) -> str:
    """`eval at step 10/20  eval_loss 4.8123 over 1,234 tokens`."""
    return f"[rayquant] eval at step {step}/{total}  eval_loss {loss:.4f} over {tokens:,} tokens"


class ProgressPrinter(UserCallback):
    """Ray Train callback (runs in the controller, whose output Ray forwards to the driver): one
    line per logging step, with the cluster's tokens/s (summed over workers). With `progress_file`
    (the controller runs on the driver's node), the last step every rank reported is kept there
    for the driver's restart records (rayquant.restarts)."""

    def __init__(self, progress_file: str | Path | None = None) -> None:
        self.progress_file = progress_file

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        steps = [int(m["step"]) for m in metrics or () if "step" in m]
        if self.progress_file is not None and steps:
            self._keep(min(steps), checkpoint is not None)
        if metrics and "eval_loss" in metrics[0]:  # equal on every rank (token-weighted over all)
            m = metrics[0]
            print(format_eval(int(m["step"]), int(m["total_steps"]), float(m["eval_loss"]),
                              int(m.get("eval_tokens", 0))), flush=True)
            return
        if not metrics or "loss" not in metrics[0]:
            if checkpoint is not None and metrics and "checkpoint_step" in metrics[0]:
                print(f"[rayquant] checkpoint at step {int(metrics[0]['checkpoint_step'])}", flush=True)
            return
        m = metrics[0]
        tps = sum(float(x.get("tokens_per_s", 0.0)) for x in metrics)
        print(format_progress(int(m["step"]), int(m["total_steps"]), float(m["loss"]), tps,
                              float(m.get("elapsed_s", 0.0))), flush=True)

    def _keep(self, step: int, checkpointed: bool) -> None:
        """The last step reported, and the step of the last checkpoint Ray Train registered (what
        a restart resumes from), in the progress file (kept across the run's attempts)."""
        from planner.atomic import write_atomically

        path = Path(self.progress_file)
        try:
            progress = json.loads(path.read_text())
        except (OSError, ValueError):
            progress = {"checkpoint_step": 0}
        progress["step"] = step
        if checkpointed:
            progress["checkpoint_step"] = step
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(progress))

    def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
        for rank, exc in sorted(worker_exceptions.items()):
            print(f"[rayquant] worker rank {rank} failed: {exc}", flush=True)
