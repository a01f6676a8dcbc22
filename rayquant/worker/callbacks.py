"""The TrainerCallback that reports each rank's progress and checkpoints to Ray Train."""

from __future__ import annotations

import time
from pathlib import Path

from planner.plan import NodePlan
from rayquant.worker import oom
from rayquant.worker.checkpoint import CheckpointState, report_checkpoint


def ray_report(rank: int, node_plan: NodePlan, total_steps: int, world_size: int, global_batch_size: int):
    """A callback that reports metrics at every logging step, and each HF checkpoint, to Ray Train
    (on every rank: Ray Train waits for all ranks' reports). After training its `tokens` and `losses`
    hold this rank's token count and (step, loss) curve."""
    import ray.train
    from transformers import TrainerCallback

    class RayReport(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = self.last_t = time.perf_counter()
            self.last_tokens = 0.0
            self.tokens = 0.0
            self.losses: list[tuple[int, float]] = []

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.last_t = time.perf_counter()
            oom.reached["step"] = state.global_step  # what an out-of-memory report names

        def on_step_end(self, args, state, control, **kw):
            oom.reached["step"] = state.global_step

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            now = time.perf_counter()
            tokens = float(logs.get("num_tokens", self.tokens))
            window_s = max(now - self.last_t, 1e-9)
            tps = (tokens - self.last_tokens) / window_s if tokens >= self.last_tokens else 0.0
            self.last_t, self.last_tokens, self.tokens = now, tokens, tokens
            if "loss" in logs:
                self.losses.append((state.global_step, float(logs["loss"])))
            metrics = {"step": state.global_step, "total_steps": total_steps, "rank": rank,
                       "tokens_per_s": tps, "elapsed_s": now - self.t0,
                       "predicted_tokens_per_s": node_plan.tokens_per_second}
            metrics.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})
            ray.train.report(metrics)

        def on_save(self, args, state, control, **kw):
            run_state = None
            if rank == 0:
                run_state = CheckpointState(global_step=state.global_step,
                                            data_position_rows=state.global_step * global_batch_size,
                                            world_size=world_size, losses=tuple(self.losses))
            report_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}", run_state,
                              {"step": state.global_step, "total_steps": total_steps, "rank": rank,
                               "checkpoint_step": state.global_step})

    return RayReport()
