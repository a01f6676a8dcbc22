"""Plan one job across a mixed cluster (H100 nodes and A10G nodes) and show what each worker gets.

    python examples/mixed_cluster_plan.py
    python examples/mixed_cluster_plan.py --inventory examples/inventory.yaml

Each node type gets its own quantization and micro-batch; every worker takes the same number of
optimizer steps, with a share of the global batch in proportion to its speed. The label selectors are
what RayQuantTrainer.fit() passes to Ray Train to pin each rank to a node of its type.
"""

from __future__ import annotations

import argparse
import collections

from planner import JobSpec, PlanError, make_plan, parse_gpu_spec
from planner.vocab import render_settings
from rayquant.cli.errors import cli_spelling
from rayquant.inventory import load_inventory_file
from rayquant.placement import worker_label_selectors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="meta-llama/Llama-3.1-8B", help="catalog id or config.json path")
    ap.add_argument("--gpus", default="2x8xH100-80GB,4x1xA10G", help="NODESxGPUSxGPU entries")
    ap.add_argument("--inventory", help="YAML/JSON inventory file instead of --gpus")
    ap.add_argument("--global-batch", type=int, default=64, help="sequences per optimizer step")
    args = ap.parse_args()
    try:
        if args.inventory:
            node_types = load_inventory_file(args.inventory)
        else:
            node_types = parse_gpu_spec(args.gpus)
        plan = make_plan(args.model, node_types, JobSpec(global_batch_size=args.global_batch))
    except PlanError as e:
        print(f"error: {e.render(cli_spelling)}")
        return 2
    print(f"{plan.num_workers} workers, global batch {plan.global_batch_size} "
          f"(asked {args.global_batch}), ~{plan.tokens_per_second:,.0f} tokens/s")
    for p in plan.node_plans:
        print(f"  {p.node_type:<14} {p.num_workers:>3} workers  {p.quantization:<12} micro {p.micro_batch_size}"
              f" x accum {p.gradient_accumulation_steps} = {p.samples_per_step} samples/step  "
              f"{p.tokens_per_second:,.0f} tok/s/worker")
    for w in plan.warnings:  # settings named neutrally in the plan, spelled as the CLI's flags here
        print(f"  warning: {render_settings(w, cli_spelling)}")
    selectors = worker_label_selectors(plan, node_types)
    counts = collections.Counter(tuple(sorted(s.items())) for s in selectors)
    print("label selectors (one per rank, for ScalingConfig(label_selector=[...])):")
    for selector, n in counts.items():
        print(f"  {n:>3} x {dict(selector)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
