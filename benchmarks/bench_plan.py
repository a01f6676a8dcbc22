"""Benchmark (not a test): `rayquant plan` start-up and search time.

Prints (1) the wall time of `rayquant plan` on a mixed cluster as a ratio to `python -c "import
click"` (both fresh processes, best of N), and (2) make_plan's time on a 1,000-node mixed inventory.

    python benchmarks/bench_plan.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


# The console script's entry point, run the way the `rayquant` script runs it.
PLAN_CODE = ("import sys; from rayquant.cli import main; sys.argv = ['rayquant', 'plan', '--model', "
             "'meta-llama/Llama-3.1-8B', '--gpus', '2x8xH100-80GB,4x1xA10G,2x1xL4', '--json']; main()")


def best_wall_s(cmd: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement (best is kept)")
    args = parser.parse_args()
    py = sys.executable
    click_s = best_wall_s([py, "-c", "import click"], args.repeats)
    plan_s = best_wall_s([py, "-c", PLAN_CODE], args.repeats)
    print(f"python -c 'import click': {click_s * 1000:.0f} ms")
    print(f"rayquant plan (8B, 3 node types): {plan_s * 1000:.0f} ms  ({plan_s / click_s:.2f}x import click)")

    from planner.hardware import parse_gpu_spec
    from planner.plan import JobSpec
    from planner.search import make_plan

    inventory = parse_gpu_spec("300x8xH100-80GB,250x1xA10G,200x4xL4,150x2xT4,100x8xA100-80GB")
    job = JobSpec(seq_len=2048, global_batch_size=8192)
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plan = make_plan("meta-llama/Llama-3.1-8B", inventory, job)
        best = min(best, time.perf_counter() - t0)
    nodes = sum(nt.count for nt in inventory)
    print(f"make_plan on {nodes} nodes / {len(inventory)} node types / {plan.num_workers} workers: "
          f"{best * 1000:.0f} ms")


if __name__ == "__main__":
    main()
