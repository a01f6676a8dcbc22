"""Time per optimizer step through RayQuantTrainer (local Ray, 2 CPU workers, DDP over gloo) against
the same Unsloth + TRL SFTTrainer run directly in one process, on the same tiny model, data, global
batch, quantization and optimizer. Ray's start-up (ray.init) is reported separately.

    .venv/bin/python benchmarks/bench_trainer.py [--steps 20] [--json]

Per-step times are each run's training wall time over its steps (first step included in both).
On a CPU-only machine Ray gives each worker one thread (OMP_NUM_THREADS=1), the direct run uses all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

MODEL = "rayquant/tiny-llama"
DATA = os.path.join(os.path.dirname(__file__), "..", "examples", "data", "tiny_alpaca.jsonl")


def _trainer(steps: int, storage: str):
    from rayquant.trainer import RayQuantTrainer

    return RayQuantTrainer(
        model=MODEL, dataset=DATA, lora={"rank": 8, "alpha": 16},
        sft={"seq_len": 128, "global_batch_size": 8, "learning_rate": 3e-3, "max_steps": steps,
             "logging_steps": 10, "quantization": "nf4", "optimizer": "adamw_8bit"},
        scaling={"num_workers": 2}, run={"name": "bench", "storage_path": storage})


def direct_run(steps: int, storage: str) -> dict:
    """One process: the plan's rank-0 settings, accumulation scaled up to the whole global batch."""
    import unsloth  # noqa: F401  (before transformers/TRL)

    from rayquant.contract import SftSettings
    from rayquant.loading import load_for_training
    from rayquant.models import resolve_model
    from rayquant.worker.sft import make_sft_trainer

    rq = _trainer(steps, storage)
    plan = rq.plan()
    node = plan.node_plans[0]
    node = dataclasses.replace(node, gradient_accumulation_steps=plan.global_batch_size // node.micro_batch_size)
    data = rq.prepare_data()
    t0 = time.perf_counter()
    model, tok, _ = load_for_training(resolve_model(MODEL), node, plan.job, device_map={"": "cpu"})
    load_s = time.perf_counter() - t0
    settings = SftSettings.from_options(rq.options.sft, max_steps=steps, seq_len=plan.job.seq_len,
                                        dataset_format=data.format)
    from rayquant.tokens import tokenize

    rows = tokenize(data, tok, plan.job.seq_len).dataset  # the rows as the driver tokenizes them
    trainer, optimizer = make_sft_trainer(model, tok, rows, node, settings, tempfile.mkdtemp())
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"load_s": load_s, "train_s": train_s, "step_s": train_s / steps, "optimizer": optimizer,
            "first_loss": losses[0], "last_loss": losses[-1], "train_loss": out.training_loss}


def ray_run(steps: int, storage: str) -> dict:
    import ray

    from rayquant.cluster import connect

    t0 = time.perf_counter()
    connect()
    startup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = _trainer(steps, storage).fit()
    fit_s = time.perf_counter() - t0
    ray.shutdown()
    train_s = max(w["train_s"] for w in result.manifest["workers"])  # the slowest rank paces DDP
    return {"ray_init_s": startup_s, "fit_wall_s": fit_s, "train_s": train_s, "step_s": train_s / steps,
            "overhead_outside_training_s": fit_s - train_s,
            "first_loss": result.manifest["loss"]["first"], "last_loss": result.manifest["loss"]["last"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    storage = tempfile.mkdtemp(prefix="rayquant-bench-")
    direct = direct_run(args.steps, storage)
    ray_res = ray_run(args.steps, storage)
    res = {"steps": args.steps, "direct": direct, "ray": ray_res,
           "step_time_ratio_ray_over_direct": ray_res["step_s"] / direct["step_s"]}
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"steps: {args.steps} (global batch 8 x 128 tokens, tiny llama, nf4, adamw_8bit)")
    print(f"direct (1 process):         {direct['step_s'] * 1000:8.1f} ms/step  (load {direct['load_s']:.1f} s)")
    print(f"RayQuantTrainer (2 workers): {ray_res['step_s'] * 1000:8.1f} ms/step")
    print(f"ratio ray/direct:            {res['step_time_ratio_ray_over_direct']:8.2f}")
    print(f"ray.init start-up:           {ray_res['ray_init_s']:8.1f} s")
    print(f"fit() wall (incl. worker start, load, gather): {ray_res['fit_wall_s']:.1f} s")


if __name__ == "__main__":
    main()
