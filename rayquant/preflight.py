"""Everything the driver can check before Ray starts, for `rayquant train --dry-run` and at the start
of RayQuantTrainer.fit() alike (RayQuantTrainer.check()).

- the data: every row loaded and checked (rayquant.data), evaluation rows split off or loaded;
- the plan, and that Ray Train can run it as one job (ZeRO-3 groups, one bundle shape);
- the model: its config, tokenizer and weights can be had, on the driver (rayquant.models), and
  sft.seq_len against the model's context;
- every row tokenized with the real tokenizer and template at sft.seq_len (rayquant.tokens): the
  rows that keep no trainable token are named, with the seq_len that keeps them; none left is an
  error; with packing, the packed rows;
- enough rows for one global batch, and a trainable token in every rank's shard;
- a CPU plan's workers fit the node's RAM together;
- the tracking integrations asked for are installed (else skipped, with a message).

Problems with the input raise the input's error (DatasetError, ConfigError, PlanError and its
subclasses: exit 2 with a fix); what is worth knowing but does not stop the run is a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from planner.plan import TrainingPlan
from rayquant.config import ConfigError
from rayquant.data import PreparedData
from rayquant.models import ModelCheck
from rayquant.tokens import TokenizedData

GIB = 2**30


@dataclass(frozen=True)
class CheckReport:
    """What the checks found; fit() trains from it (the tokenized rows, the steps)."""

    plan: TrainingPlan
    model: ModelCheck
    data: PreparedData  # the training rows (without the rows held out for evaluation)
    tokens: TokenizedData  # what the workers train on
    eval_data: PreparedData | None
    eval_tokens: TokenizedData | None
    total_steps: int
    shards: tuple[dict, ...]  # per rank: rows, source rows, rows cut at seq_len, trainable tokens
    warnings: tuple[str, ...]
    report_to: tuple[str, ...]  # the integrations that can run here

    def data_summary(self) -> dict[str, Any]:
        """The manifest's and `--dry-run --json`'s account of the data."""
        out: dict[str, Any] = {"source": self.data.source, "format": self.data.format,
                               "train": self.tokens.summary(self.data),
                               "per_rank": [dict(rank=r, **s) for r, s in enumerate(self.shards)]}
        if self.eval_tokens is not None:
            out["eval"] = dict(self.eval_tokens.summary(self.eval_data), source=self.eval_data.source)
        return out


def _load_tokenizer(model: ModelCheck):
    from transformers import AutoTokenizer

    from rayquant.models import ModelUnavailableError

    try:
        return AutoTokenizer.from_pretrained(model.tokenizer_dir)
    except (OSError, ValueError) as e:  # a directory without a usable tokenizer
        raise ModelUnavailableError(f"the tokenizer of {model.model} could not be loaded from "
                                    f"{model.tokenizer_dir}: {e}. To fix: use a model whose repo or "
                                    "directory holds its tokenizer") from None


def host_ram_problems(plan: TrainingPlan, local_ram_bytes: int | None) -> list[str]:
    """CPU node plans whose workers together need more RAM than a node has (each CPU worker's
    budget is the whole node's RAM, so the planner alone does not see them add up)."""
    problems = []
    for p in plan.node_plans:
        if p.gpu != "CPU" or p.workers_per_node < 2:
            continue
        need = p.workers_per_node * (p.peak_memory_bytes + p.host_memory_bytes)
        have = p.memory_budget_bytes if local_ram_bytes is None else min(p.memory_budget_bytes, local_ram_bytes)
        if need > have:
            problems.append(
                f"node type {p.node_type}: {p.workers_per_node} workers x "
                f"{(p.peak_memory_bytes + p.host_memory_bytes) / GIB:.1f} GiB planned = {need / GIB:.1f} GiB, "
                f"more than the node's {have / GIB:.1f} GiB of RAM (less the safety margin). To fix: fewer "
                "workers ({scaling.num_workers}), a shorter {seq_len} or a smaller {micro_batch_size}")
    return problems


def run_checks(trainer) -> CheckReport:
    """All the checks, for RayQuantTrainer `trainer` (its data, options, plan and model)."""
    from rayquant.data import prepare, shard_indices, split_eval, steps_per_epoch
    from rayquant.models import check_model
    from rayquant.tokens import require_trainable, tokenize
    from rayquant.tracking import available
    from rayquant.trainer import check_plan_runs

    opts = trainer.options
    sft = opts.sft
    warnings: list[str] = []
    data = trainer.prepare_data()
    eval_data = None
    if trainer.eval_dataset is not None:
        subset = trainer.eval_dataset_subset
        if subset is None and trainer.eval_dataset == trainer.dataset:
            subset = trainer.dataset_subset
        eval_data = prepare(trainer.eval_dataset, sft.dataset_format, sft.text_field, shuffle_seed=None,
                            split=trainer.eval_dataset_split, subset=subset, role="eval")
    elif sft.eval_fraction > 0:
        data, eval_data = split_eval(data, sft.eval_fraction)

    plan = trainer.plan()
    check_plan_runs(plan, opts.scaling.cpus_per_worker)
    model = check_model(trainer.model)
    seq_len = plan.job.seq_len
    problems: list[str] = []
    if model.context_length is not None and seq_len > model.context_length:
        text = (f"{{seq_len}} {seq_len} is beyond {trainer.model}'s context of {model.context_length} "
                "tokens (its config's max_position_embeddings)")
        if plan.node_plans[0].backend == "hf":
            problems.append(text + ": positions past it are untrained. To fix: lower {seq_len} to "
                            f"{model.context_length}, or use {{backend}} unsloth, which extends the "
                            "context by RoPE scaling")
        else:
            warnings.append(text + ": Unsloth extends it by RoPE scaling; quality past the trained "
                            "context is not guaranteed")

    tokenizer = _load_tokenizer(model)
    tokens = tokenize(data, tokenizer, seq_len, packing=sft.packing, seed=sft.seed)
    require_trainable(tokens, data)
    if tokens.dropped:
        warnings.append(tokens.dropped_text(data) + ": they are left out")
    eval_tokens = None
    if eval_data is not None:
        eval_tokens = tokenize(eval_data, tokenizer, seq_len)
        require_trainable(eval_tokens, eval_data, "evaluation")
        if eval_tokens.dropped:
            warnings.append(eval_tokens.dropped_text(eval_data) + ": left out of evaluation")

    for attr in ("optimizer", "backend"):
        values = {getattr(p, attr) for p in plan.node_plans}
        if len(values) > 1:
            problems.append(f"the plan's node types use different {attr}s ({', '.join(sorted(values))}); "
                            f"DDP needs one, so every rank applies the same update. To fix: "
                            f"pin it ({{{attr}}}) and re-plan")
    per_rank = [plan.for_rank(r)[1].samples_per_step for r in range(plan.num_workers)]
    epoch_steps = steps_per_epoch(tokens.num_rows, per_rank)
    shards: tuple[dict, ...] = ()
    if epoch_steps < 1:
        rows = f"{tokens.num_rows} {'packed rows' if tokens.packed else 'rows'}"
        left = f" ({len(tokens.dropped)} of {tokens.rows} left out: they train nothing)" if tokens.dropped else ""
        problems.append(f"the dataset gives {rows}{left}, fewer than one global batch of {sum(per_rank)}. "
                        "To fix: add rows or lower {global_batch_size}")
    else:
        shards = tuple(tokens.shard_stats(shard_indices(tokens.num_rows, per_rank, r))
                       for r in range(plan.num_workers))
        for r, s in enumerate(shards):
            if s["trainable_tokens"] == 0:
                problems.append(f"rank {r}'s shard ({s['rows']} rows) holds no trainable token. To fix: "
                                "give rows with something to learn")
    local = trainer._ray_address() is None
    if any(p.gpu == "CPU" for p in plan.node_plans):
        from planner.host import host_memory_bytes

        problems += host_ram_problems(plan, host_memory_bytes() if local else None)
    if problems:
        raise ConfigError(problems, "training setup")

    report_to, skipped = available(opts.run.report_to)
    warnings += skipped
    total = sft.max_steps or max(1, math.ceil(sft.num_epochs * epoch_steps))
    return CheckReport(plan=plan, model=model, data=data, tokens=tokens, eval_data=eval_data,
                       eval_tokens=eval_tokens, total_steps=total, shards=shards,
                       warnings=tuple(warnings), report_to=report_to)
