"""Plan a fine-tuning job offline: no Ray, no GPU, no torch; just the planner.

    python examples/offline_plan.py
    python examples/offline_plan.py --model Qwen/Qwen2.5-7B --gpus 1x1xA10G --seq-len 4096

Prints each node type's choices with their reasons, then what the longest sequence at that micro-batch
would be. The same plan comes from `rayquant plan --model ... --gpus ...`.
"""

from __future__ import annotations

import argparse

from planner import JobSpec, PlanError, estimate_memory, load_model_spec, make_plan, max_seq_len, parse_gpu_spec

GIB = 1024**3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="meta-llama/Llama-3.1-8B", help="catalog id or config.json path")
    ap.add_argument("--gpus", default="1x1xL4", help="NODESxGPUSxGPU entries, comma-separated")
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step")
    args = ap.parse_args()
    try:
        model = load_model_spec(args.model)
        node_types = parse_gpu_spec(args.gpus)
        plan = make_plan(model, node_types, JobSpec(seq_len=args.seq_len, global_batch_size=args.global_batch))
    except PlanError as e:
        print(f"error: {e}")
        return 2
    print(f"{model.name}: {model.num_params / 1e9:.2f}B parameters, {plan.num_workers} worker(s), "
          f"global batch {plan.global_batch_size}, ~{plan.tokens_per_second:,.0f} tokens/s")
    gpus = {nt.key: nt.gpu for nt in node_types}
    for p in plan.node_plans:
        print(f"\n{p.node_type}: {p.quantization}, micro-batch {p.micro_batch_size} x "
              f"{p.gradient_accumulation_steps} accumulation, {p.optimizer}, checkpointing "
              f"{p.gradient_checkpointing}, {p.placement}; peak {p.peak_memory_bytes / GIB:.1f} of "
              f"{p.memory_budget_bytes / GIB:.1f} GiB")
        for choice, reason in p.reasons.items():
            print(f"  {choice:>22}: {reason}")
        settings = dict(quantization=p.quantization, double_quant=p.double_quant, backend=p.backend,
                        micro_batch_size=p.micro_batch_size, lora_rank=plan.job.lora_rank,
                        lora_targets=plan.job.lora_targets, full_finetune=plan.job.full_finetune,
                        gradient_checkpointing=p.gradient_checkpointing, optimizer=p.optimizer)
        longest = max_seq_len(model, gpus[p.node_type], **settings)
        estimate = estimate_memory(model, gpus[p.node_type], seq_len=args.seq_len, **settings)
        print(f"  longest sequence that fits at this micro-batch: {longest:,} tokens "
              f"(estimate at {args.seq_len}: {estimate.peak_bytes / GIB:.1f} GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
