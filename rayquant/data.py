"""Training data: load (HF Dataset, Ray Data, JSON/JSONL/Parquet), check every row, normalize to
one of TRL's formats, and shard by rank in proportion to each rank's samples per optimizer step.

Formats (detected from the columns unless given):
- text:     a string column (`text_field`, default "text"); loss on every token.
- messages: a list of {"role", "content"} turns; the tokenizer's chat template renders them and the
            loss covers assistant tokens only (TRL's assistant_only_loss, via {% generation %}).
- alpaca:   instruction / input (optional) / output; rendered as a prompt and a completion, loss on
            the completion only (TRL's completion_only_loss).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_PROBLEMS = 20
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class DatasetError(ValueError):
    """The data cannot be used: which rows, which fields, what was expected."""

    def __init__(self, problems: list[str], total: int | None = None, source: str = "dataset") -> None:
        self.problems = list(problems)
        total = len(self.problems) if total is None else total
        shown = "\n".join(f"  - {p}" for p in self.problems)
        more = f"\n  ... and {total - len(self.problems)} more" if total > len(self.problems) else ""
        super().__init__(f"{source} has {total} problem{'s' if total != 1 else ''}:\n{shown}{more}\n"
                         f"To fix: correct or drop these rows (formats: text field, chat `messages`, "
                         f"or alpaca instruction/input/output).")


def load_rows(source: Any) -> "datasets.Dataset":  # noqa: F821
    """A Hugging Face Dataset from a Dataset, a Ray Data dataset, a list of dicts, or a file path."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        if "train" not in source:
            raise DatasetError([f"DatasetDict has splits {sorted(source)}; pass the training split"])
        return source["train"]
    if isinstance(source, (list, tuple)):
        if not all(isinstance(r, dict) for r in source):
            raise DatasetError(["a list dataset must hold one dict per row"])
        return datasets.Dataset.from_list(list(source))
    if type(source).__module__.startswith("ray.data"):
        # Ray Data: materialized on the driver, so rows are checked before any worker starts.
        return datasets.Dataset.from_list(source.take_all())
    if isinstance(source, (str, os.PathLike)):
        path = os.path.expanduser(str(source))
        if not os.path.exists(path):
            raise DatasetError([f"{path} does not exist; pass a JSON, JSONL or Parquet file"])
        ext = os.path.splitext(path)[1].lower()
        kinds = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
        if ext not in kinds:
            raise DatasetError([f"{path}: unsupported extension {ext!r}; use .json, .jsonl or .parquet"])
        try:
            return datasets.load_dataset(kinds[ext], data_files=path, split="train")
        except Exception as e:  # the loaders raise many types for malformed files
            raise DatasetError([f"{path} could not be read as {kinds[ext]}: {type(e).__name__}: {e}"]) from None
    raise DatasetError([f"unsupported dataset type {type(source).__name__}; pass a datasets.Dataset, a "
                        f"ray.data.Dataset, a list of dicts or a JSON/JSONL/Parquet path"])


def detect_format(columns: Sequence[str], requested: str = "auto", text_field: str = "text") -> str:
    if requested != "auto":
        return requested
    if "messages" in columns:
        return "messages"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if text_field in columns:
        return "text"
    raise DatasetError([f"cannot tell the format from columns {list(columns)}: expected a "
                        f"'{text_field}' column (text), 'messages' (chat) or 'instruction' + 'output' "
                        f"(alpaca); set sft.dataset_format / sft.text_field"])


def _row_problems(i: int, row: dict, fmt: str, text_field: str) -> list[str]:
    def nonempty_str(v: Any) -> bool:
        return isinstance(v, str) and v.strip() != ""

    if fmt == "text":
        v = row.get(text_field)
        return [] if nonempty_str(v) else [f"row {i}: field '{text_field}': expected a non-empty string, "
                                           f"got {v!r}"]
    if fmt == "alpaca":
        out = []
        for key in ("instruction", "output"):
            if not nonempty_str(row.get(key)):
                out.append(f"row {i}: field '{key}': expected a non-empty string, got {row.get(key)!r}")
        if row.get("input") is not None and not isinstance(row.get("input"), str):
            out.append(f"row {i}: field 'input': expected a string or null, got {row.get('input')!r}")
        return out
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return [f"row {i}: field 'messages': expected a non-empty list of {{role, content}} turns, got {msgs!r}"]
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            out.append(f"row {i}: field 'messages[{j}]': expected a {{role, content}} mapping, got {m!r}")
            continue
        if m.get("role") not in ROLES:
            out.append(f"row {i}: field 'messages[{j}].role': expected one of {', '.join(ROLES)}, "
                       f"got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            out.append(f"row {i}: field 'messages[{j}].content': expected a string, got {m.get('content')!r}")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
        out.append(f"row {i}: field 'messages': expected at least one assistant turn to learn from")
    return out


def check_rows(ds, fmt: str, text_field: str = "text", cap: int = MAX_REPORTED_PROBLEMS,
               source: str = "dataset") -> None:
    """Raise DatasetError listing bad rows (the first `cap` of them, and how many in all)."""
    problems: list[str] = []
    total = 0
    if len(ds) == 0:
        raise DatasetError(["the dataset is empty"], source=source)
    for i, row in enumerate(ds):
        found = _row_problems(i, row, fmt, text_field)
        total += len(found)
        problems.extend(found[: max(0, cap - len(problems))])
    if total:
        raise DatasetError(problems, total=total, source=source)


def normalize(ds, fmt: str, text_field: str = "text"):
    """Only the columns TRL needs for `fmt`: text | messages | prompt + completion."""
    if fmt == "text":
        return ds.select_columns([text_field]).rename_column(text_field, "text") \
            if text_field != "text" else ds.select_columns(["text"])
    if fmt == "messages":
        def clean(row: dict) -> dict:
            return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
        return ds.map(clean, remove_columns=ds.column_names)

    def render(row: dict) -> dict:
        template = ALPACA_PROMPT_WITH_INPUT if (row.get("input") or "").strip() else ALPACA_PROMPT
        return {"prompt": template.format(instruction=row["instruction"], input=row.get("input") or ""),
                "completion": row["output"]}
    return ds.map(render, remove_columns=ds.column_names)


@dataclass(frozen=True)
class PreparedData:
    dataset: Any  # datasets.Dataset with normalized columns
    format: str
    num_rows: int


def prepare(source: Any, fmt: str = "auto", text_field: str = "text", shuffle_seed: int | None = 0) -> PreparedData:
    """Load, check every row, normalize, shuffle once (the order every rank's shard is cut from)."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else "dataset"
    ds = load_rows(source)
    fmt = detect_format(ds.column_names, fmt, text_field)
    check_rows(ds, fmt, text_field, source=name)
    ds = normalize(ds, fmt, text_field)
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed).flatten_indices()
    return PreparedData(dataset=ds, format=fmt, num_rows=len(ds))


def steps_per_epoch(num_rows: int, samples_per_step: Sequence[int]) -> int:
    """Optimizer steps one pass over the rows gives when every step takes sum(samples_per_step)."""
    return num_rows // sum(samples_per_step)


def shard_indices(num_rows: int, samples_per_step: Sequence[int], rank: int) -> list[int]:
    """Row indices of `rank`'s shard, in training order.

    Rows are cut into global batches of sum(samples_per_step) rows; in each, rank r takes the
    contiguous slice of samples_per_step[r] rows after the ranks before it. Every rank thus gets the
    same number of optimizer steps, a share in proportion to its micro-batch x accumulation, and
    step s of every rank comes from global batch s (what a single-process run over the same global
    batches would see). The remainder (< one global batch) is dropped.
    """
    if not 0 <= rank < len(samples_per_step):
        raise ValueError(f"rank {rank} is not in 0..{len(samples_per_step) - 1}")
    global_batch = sum(samples_per_step)
    offset = sum(samples_per_step[:rank])
    mine = samples_per_step[rank]
    return [s * global_batch + offset + k
            for s in range(steps_per_epoch(num_rows, samples_per_step)) for k in range(mine)]
