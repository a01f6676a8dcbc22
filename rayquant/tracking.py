"""Experiment tracking (`run.report_to: [tensorboard, mlflow, wandb]`) through transformers'
integrations, from rank 0 only, with the plan and the run's options logged as parameters.

transformers' TensorBoardCallback, MLflowCallback and WandbCallback act on the world process zero
only, so under Ray Train's DDP only rank 0 logs, with no extra code. What rayquant adds:
- where each logs by default, under the run directory (`tracking_env`, set in the workers'
  environment): TensorBoard event files in <run dir>/tensorboard, an MLflow file store in
  <run dir>/mlruns (MLflow 3 needs MLFLOW_ALLOW_FILE_STORE=true for one), W&B files in <run dir>
  (project `rayquant`); a tracking server or project the user set (MLFLOW_TRACKING_URI,
  WANDB_PROJECT, ...) is forwarded to the workers instead;
- the run's name, shared by every tracker (the Ray Train run's name);
- the plan and the run's options as parameters (`RunParams`): flat scalars as MLflow params, the
  whole plan and options as MLflow artifacts, W&B config and TensorBoard text;
- an integration whose package is missing is skipped with a message (`available`), not a crash.
Light at import.
"""

from __future__ import annotations

import json
import os
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Mapping

# The package each integration needs (transformers' is_*_available look for these).
PACKAGES = {"tensorboard": ("tensorboardX", "tensorboard"), "mlflow": ("mlflow",), "wandb": ("wandb",)}
INSTALL = {"tensorboard": "pip install tensorboardX", "mlflow": "pip install mlflow-skinny",
           "wandb": "pip install wandb"}
# The user's own tracking settings, forwarded to the workers as they are.
FORWARDED_PREFIXES = ("MLFLOW_", "WANDB_", "TENSORBOARD_", "HF_MLFLOW_")
MLFLOW_PARAM_LIMIT = 500  # characters; MLflow refuses longer parameter values (the full plan is an artifact)


def available(report_to: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """(the integrations of `report_to` whose package is installed here, a message for each one
    skipped)."""
    usable, skipped = [], []
    for name in report_to:
        if any(find_spec(pkg) is not None for pkg in PACKAGES[name]):
            usable.append(name)
        else:
            skipped.append(f"report_to: {name} skipped: its package ({' or '.join(PACKAGES[name])}) is "
                           f"not installed. To use it: {INSTALL[name]}")
    return tuple(usable), skipped


def tracking_env(report_to: tuple[str, ...], run_dir: str | os.PathLike,
                 environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The workers' environment for `report_to`: the user's tracking variables, and defaults that
    keep every tracker's files under `run_dir` (an absolute path: Ray Train may change a worker's
    directory). The run's name reaches every tracker as the trainer's run_name."""
    env = {k: v for k, v in environ.items() if k.startswith(FORWARDED_PREFIXES)}
    run_dir = Path(run_dir).expanduser().resolve()
    if "tensorboard" in report_to:
        env.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    if "mlflow" in report_to:
        if "MLFLOW_TRACKING_URI" not in env:
            env["MLFLOW_TRACKING_URI"] = (run_dir / "mlruns").as_uri()
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3: a file store only when asked for
        env.setdefault("MLFLOW_EXPERIMENT_NAME", "rayquant")
    if "wandb" in report_to:
        env.setdefault("WANDB_DIR", str(run_dir))
        env.setdefault("WANDB_PROJECT", "rayquant")
    return env


def finish_runs(report_to: tuple[str, ...]) -> None:
    """End the tracking runs this process opened, once training is done: W&B's run stays open until
    its process exits (transformers' WandbCallback does not finish it), and a Ray Train worker may
    be ended before W&B writes out what it holds, an offline run's history included."""
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def flat_params(value: Any, prefix: str) -> dict[str, Any]:
    """Nested mappings and lists as flat `prefix.key.0.sub` scalars (MLflow's parameter form)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flat_params(v, f"{prefix}.{k}"))
        return out
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (Mapping, list, tuple)) for v in value):
            return {prefix: ",".join(map(str, value))}
        out = {}
        for i, v in enumerate(value):
            out.update(flat_params(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}


def run_params_callback(plan: Mapping[str, Any], run_config: Mapping[str, Any] | None):
    """A TrainerCallback that logs the plan and the run's options to each tracker rank 0 reports
    to, once the integrations have started their runs (user callbacks come after them). Set its
    `handler` to the trainer's callback_handler (TensorBoard's writer is found there)."""
    from transformers import TrainerCallback

    options = dict(run_config or {})

    class RunParams(TrainerCallback):
        handler = None

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero or not args.report_to:
                return
            params = {**flat_params(options, "rayquant"),
                      **flat_params({k: plan.get(k) for k in ("model", "job", "warnings")}, "plan"),
                      **{f"plan.node_plans.{p['node_type']}.{k}": p.get(k) for p in plan.get("node_plans", ())
                         for k in ("quantization", "micro_batch_size", "gradient_accumulation_steps",
                                   "optimizer", "gradient_checkpointing", "placement", "nodes",
                                   "workers_per_node")}}
            if "mlflow" in args.report_to:
                import mlflow

                if mlflow.active_run() is not None:
                    mlflow.log_params({k: str(v)[:MLFLOW_PARAM_LIMIT] for k, v in params.items()})
                    mlflow.log_dict(dict(plan), "rayquant/plan.json")
                    mlflow.log_dict(options, "rayquant/config.json")
            if "wandb" in args.report_to:
                import wandb

                if wandb.run is not None:
                    wandb.config.update({"rayquant": options, "plan": dict(plan)}, allow_val_change=True)
            if "tensorboard" in args.report_to:
                from transformers.integrations import TensorBoardCallback

                for cb in getattr(self.handler, "callbacks", ()):
                    if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None:
                        cb.tb_writer.add_text("rayquant/plan", json.dumps(dict(plan), indent=2))
                        cb.tb_writer.add_text("rayquant/config", json.dumps(options, indent=2))

    return RunParams()
