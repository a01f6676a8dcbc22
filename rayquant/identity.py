"""A run's identity: what decides what it trains (model, data, LoRA, SFT settings, the plan's
training-relevant fields), written into its run directory when it starts, and compared when the
same run.name is started again and resumes from that directory's checkpoint.

A resumed run continues the optimizer, the schedule and the data position of the run that wrote
the checkpoint; resuming it under other data, another model or other settings would train a mix
of both and record only the new one. So a change is refused before Ray starts, naming each field
that differs. The few changes that keep the trained steps valid (max_steps going up; under DDP,
another split of the same global batch: other workers, rows per rank, micro-batch x accumulation,
as after a lost node) are taken with run.resume_anyway (`--resume-anyway`), and the manifest
lists them.

The dataset enters as a content hash of the tokenized rows every rank trains on (rayquant.tokens,
so a change of the file, its format, the tokenizer or seq_len all show), not as a path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from planner.atomic import write_atomically
from planner.plan import TrainingPlan
from rayquant.config import ConfigError

IDENTITY_FILE = "rayquant_identity.json"
IDENTITY_VERSION = 1
# How the global batch is split (workers, each rank's rows per step and micro-batch x
# accumulation) may change: the data position is in global steps and the token-weighted gradient
# is the same mean over the global batch whatever the split (tests/test_exact_gradients.py); a DDP
# checkpoint holds the whole adapter and optimizer. Not under ZeRO-3, whose shards are per rank.
_SPLIT_PREFIXES = ("plan.num_workers", "plan.split", "plan.batch_shape")


def rows_sha256(dataset) -> str | None:
    """Content hash of a tokenized datasets.Dataset (rayquant.tokens): every column, every row, in
    order; independent of how Arrow chunks it. None for no dataset."""
    if dataset is None:
        return None
    import numpy as np

    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    digest = hashlib.sha256()
    for name in sorted(table.column_names):
        lengths, values = hashlib.sha256(), hashlib.sha256()
        for chunk in table.column(name).chunks:
            lengths.update(np.asarray(chunk.value_lengths(), dtype=np.int64).tobytes())
            values.update(np.asarray(chunk.flatten(), dtype=np.int64).tobytes())
        digest.update(f"{name}:{len(dataset)}:{lengths.hexdigest()}:{values.hexdigest()}".encode())
    return digest.hexdigest()


def run_identity(*, model: str, plan: TrainingPlan, sft, total_steps: int, data_format: str,
                 train_rows, eval_rows=None) -> dict[str, Any]:
    """The identity of a run as plain JSON values: `sft` is rayquant.config.SftOptions, the rows
    are the tokenized datasets the workers get."""
    job = plan.job
    split, shapes, settings = [], [], []
    for r in range(plan.num_workers):
        assignment, node = plan.for_rank(r)
        split.append({"node_type": assignment.node_type, "samples_per_step": node.samples_per_step})
        shapes.append({"micro_batch_size": node.micro_batch_size,
                       "gradient_accumulation_steps": node.gradient_accumulation_steps,
                       "gradient_checkpointing": node.gradient_checkpointing})
        # what each rank computes with (its base's numerics, its optimizer), however many ranks
        numerics = {"quantization": node.quantization, "compute_dtype": node.compute_dtype,
                    "optimizer": node.optimizer, "placement": node.placement, "backend": node.backend,
                    "double_quant": node.double_quant, "fp8_path": node.fp8_path}
        if numerics not in settings:
            settings.append(numerics)
    identity = {
        "version": IDENTITY_VERSION,
        "model": model,
        "data": {"train_rows": len(train_rows), "train_sha256": rows_sha256(train_rows),
                 "eval_sha256": rows_sha256(eval_rows), "format": data_format},
        "lora": {"rank": job.lora_rank, "alpha": job.effective_lora_alpha, "dropout": job.lora_dropout,
                 "targets": list(job.lora_targets)},
        "sft": {"max_steps": total_steps, "seq_len": job.seq_len, "packing": job.packing,
                "learning_rate": sft.learning_rate, "lr_scheduler": sft.lr_scheduler,
                "warmup_steps": sft.warmup_steps, "weight_decay": sft.weight_decay,
                "max_grad_norm": sft.max_grad_norm, "seed": sft.seed},
        "plan": {"global_batch_size": plan.global_batch_size, "num_workers": plan.num_workers,
                 "settings": settings, "split": split, "batch_shape": shapes},
    }
    return json.loads(json.dumps(identity))  # canonical JSON values (lists, floats as JSON has them)


def canonical_json(identity: Mapping[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True, indent=2)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field path, before, after) for every field that differs, in the identity's order."""
    a, b = _flatten(old), _flatten(new)
    keys = list(dict.fromkeys([*a, *b]))
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def is_safe(field: str, before: Any, after: Any, checkpoint_step: int, zero3: bool = False) -> bool:
    """Whether resuming under this change keeps the steps already trained valid (`zero3`: the
    checkpoint holds ZeRO-3 shards)."""
    if field == "sft.max_steps":
        return isinstance(before, int) and isinstance(after, int) and after >= before and after > checkpoint_step
    return field.startswith(_SPLIT_PREFIXES) and not zero3


_SPELLED = {"model": "{model}", "data.train_sha256": "{dataset} (its tokenized rows)",
            "data.train_rows": "{dataset} (its number of rows)", "data.eval_sha256": "the evaluation rows",
            "data.format": "{sft.dataset_format}", "lora.alpha": "{lora.alpha}", "lora.rank": "{lora.rank}",
            "lora.dropout": "{lora.dropout}", "lora.targets": "{lora.targets}"}


def _spelled(field: str) -> str:
    """A field of the identity as the message names it: an option ({sft.seq_len}) where it is one."""
    import re

    if field in _SPELLED:
        return _SPELLED[field]
    if field.startswith("sft."):
        return "{" + field + "}"
    if field == "plan.global_batch_size":
        return "{sft.global_batch_size}"
    rank = re.fullmatch(r"plan\.(?:split|batch_shape)\[(\d+)\]\.(\w+)", field)
    if rank:
        return f"the plan's {rank.group(2)} of rank {rank.group(1)}"
    setting = re.fullmatch(r"plan\.settings\[\d+\]\.(\w+)", field)
    if setting:
        return f"the plan's {setting.group(1)}"
    return "the plan's " + field.removeprefix("plan.")


def _shown(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return value[:12]
    return json.dumps(value)


class ResumeMismatchError(ConfigError):
    """Resuming a run under settings that differ from the ones that wrote its checkpoint (a user
    error, exit 2): the message names each field and the fix."""

    def __init__(self, message: str, changes: list[tuple[str, Any, Any]]) -> None:
        self.changes = changes
        self.problems = [message]
        super(ConfigError, self).__init__(message)
        self.args = (self.render(),)


def last_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the checkpoint Ray Train resumes a run directory from: the latest one its
    checkpoint manager registered (a directory written but not registered when the run stopped is
    not resumed from). None when there is none, or it holds final adapters, not a training state."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from rayquant.worker.checkpoint import CHECKPOINT_SUBDIR, STATE_FILE

    try:
        snapshot = json.loads((Path(run_dir) / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).read_text())
        latest = snapshot["latest_checkpoint_result"]
        state = Path(run_dir) / latest["checkpoint_dir_name"] / CHECKPOINT_SUBDIR / STATE_FILE
        return int(json.loads(state.read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_resume(run_dir: Path, name: str, identity: Mapping[str, Any], resume_anyway: bool) -> list[dict]:
    """Before Ray starts: compare `identity` with the one the run directory's checkpoint was
    written under. Returns the changes taken (resume_anyway, safe ones only) as
    {"field", "before", "after"}; raises ResumeMismatchError for any other change. Writes
    `identity` into the run directory (atomically) when the run may go ahead."""
    path = Path(run_dir) / IDENTITY_FILE
    step = last_checkpoint_step(run_dir) if path.exists() else None
    taken: list[dict] = []
    if step is not None:
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if old.get("version") != IDENTITY_VERSION:
            raise ResumeMismatchError(
                f"the run {name!r} in {run_dir} was written by another rayquant (its identity file "
                f"{path.name} is not version {IDENTITY_VERSION}), so rayquant cannot tell what it trained. "
                "To fix: choose another {run.name} to start a new run", [])
        recorded = {k: v for k, v in old.items() if k != "resumed_with_changes"}
        changes = differences(recorded, identity)
        zero3 = any(p.get("placement") == "zero3" for p in recorded.get("plan", {}).get("settings", []))
        unsafe = [c for c in changes if not is_safe(*c, step, zero3)]
        if changes and (unsafe or not resume_anyway):
            lines = "\n".join(f"  - {_spelled(f)}: {_shown(a)} -> {_shown(b)}"
                              + ("" if is_safe(f, a, b, step, zero3) else "  (changes the training: not resumable)")
                              for f, a, b in changes)
            fix = ("choose another {run.name} to start a new run, or put the settings back as they were "
                   "to resume this one")
            if not unsafe:
                fix += ("; these changes are safe to resume with: set {run.resume_anyway} to continue this "
                        "run under them")
            raise ResumeMismatchError(
                f"the run {name!r} in {run_dir} has a checkpoint at step {step} written under other "
                f"settings; resuming it would continue that training with these changes:\n{lines}\n"
                f"To fix: {fix}", changes)
        taken = [{"field": f, "before": a, "after": b, "at_step": step} for f, a, b in changes]
        identity = dict(identity, resumed_with_changes=old.get("resumed_with_changes", []) + taken)
    write_atomically(path, canonical_json(identity))
    return taken
