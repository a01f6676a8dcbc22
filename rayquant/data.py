"""Training data: load (HF Dataset, Ray Data, JSON/JSONL/Parquet), check every row, normalize to
one of TRL's formats, and shard by rank in proportion to each rank's samples per optimizer step.

Formats (detected from the columns unless given):
- text:     a string column (`text_field`, default "text"); loss on every token.
- messages: a list of {"role", "content"} turns; the tokenizer's chat template renders them and the
            loss covers assistant tokens only (TRL's assistant_only_loss, via {% generation %}).
- alpaca:   instruction / input (optional) / output; rendered as a prompt and a completion, loss on
            the completion only (TRL's completion_only_loss).

Every source ends as the same normalized `datasets.Dataset` (columns text | messages | prompt +
completion, nothing else), so a Dataset, a Ray Data dataset, a list of dicts and a JSON, JSONL or
Parquet file with the same rows give the trainer the same rows. Lists and Ray Data rows are checked
as Python values before Arrow sees them: Arrow cannot hold a column of mixed types, and the user
should hear which row is wrong rather than Arrow's "Expected bytes, got a 'int' object".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_PROBLEMS = 20
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
FILE_KINDS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ROW_FIX = ("correct or drop these rows (formats: text field, chat `messages`, or alpaca "
           "instruction/input/output)")
_MISSING = object()


class DatasetError(ValueError):
    """The data cannot be used: which rows, which fields, what was expected."""

    def __init__(self, problems: list[str], total: int | None = None, source: str = "dataset",
                 fix: str = ROW_FIX) -> None:
        self.problems = list(problems)
        total = len(self.problems) if total is None else total
        shown = "\n".join(f"  - {p}" for p in self.problems)
        more = f"\n  ... and {total - len(self.problems)} more" if total > len(self.problems) else ""
        super().__init__(f"{source} has {total} problem{'s' if total != 1 else ''}:\n{shown}{more}\n"
                         f"To fix: {fix}.")


def _plain(value: Any) -> Any:
    """Python values from what Ray Data hands back (numpy arrays and scalars inside rows)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    return value


def _source_name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.path.expanduser(str(source))
    if type(source).__module__.startswith("ray.data"):
        return "Ray Data dataset"
    return "dataset"


def _json_syntax_problem(path: str) -> str | None:
    """Where a JSON (array or lines) file stops being valid JSON, or None if it parses."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as e:
            return f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return (f"line {lineno} is not valid JSON (column {e.colno}: {e.msg}); "
                    f"JSON Lines needs one object per line")
        if not isinstance(row, dict):
            return f"line {lineno} is a JSON {type(row).__name__}, expected an object (one row)"
    return None


def _is_empty_file(path: str, kind: str) -> bool:
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception:  # not Parquet at all: the loader below says so
            return False
    if os.path.getsize(path) > 4096:
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().strip() in ("", "[]")


def _load_file(path: str) -> "datasets.Dataset":  # noqa: F821
    import datasets

    fix = "pass a JSON (array of objects), JSONL (one object per line) or Parquet file with rows"
    if not os.path.exists(path):
        raise DatasetError(["the file does not exist"], source=path, fix=fix)
    if not os.path.isfile(path):
        raise DatasetError(["the path is not a file"], source=path, fix=fix)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_KINDS:
        raise DatasetError([f"unsupported extension {ext or '(none)'!r}; use .json, .jsonl or .parquet"],
                           source=path, fix=fix)
    kind = FILE_KINDS[ext]
    if _is_empty_file(path, kind):
        raise DatasetError(["the dataset is empty (no rows)"], source=path, fix="add rows to the file")
    try:
        # A "Generating train split" bar for a local file is noise on the user's console.
        datasets.disable_progress_bars()
        return datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as e:  # the loaders raise many types for malformed files
        # datasets' JSON error ("An error occurred while generating the dataset") names no line;
        # parsing it again in Python, only now that it failed, finds the line.
        syntax = _json_syntax_problem(path) if kind == "json" else None
        if syntax:
            raise DatasetError([syntax], source=path, fix="repair the file (each row one JSON object)") from None
        cause = e.__cause__ or e
        raise DatasetError([f"could not be read as {kind}: {type(cause).__name__}: {cause}"],
                           source=path, fix=fix) from None


def load_rows(source: Any) -> "datasets.Dataset | list[dict]":  # noqa: F821
    """The rows to check: a `datasets.Dataset` (from a Dataset, DatasetDict or file path), or a list
    of plain dicts (from a list of dicts or a Ray Data dataset; Ray Data is materialized on the
    driver, so its rows are checked before any worker starts, in the order Ray Data yields them)."""
    import datasets

    name = _source_name(source)
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        if "train" not in source:
            raise DatasetError([f"DatasetDict has splits {sorted(source)} and no 'train'"], source=name,
                               fix="pass the training split, e.g. dataset=ds['<split>']")
        return source["train"]
    if type(source).__module__.startswith("ray.data"):
        return [_plain(dict(row)) for row in source.take_all()]
    if isinstance(source, (list, tuple)):
        bad = [f"row {i}: expected a mapping of fields (one dict per row), got {type(r).__name__} {r!r:.60}"
               for i, r in enumerate(source) if not isinstance(r, dict)]
        if bad:
            raise DatasetError(bad[:MAX_REPORTED_PROBLEMS], total=len(bad), source=name)
        return [_plain(r) for r in source]
    if isinstance(source, (str, os.PathLike)):
        return _load_file(name)
    raise DatasetError([f"unsupported dataset type {type(source).__name__}"], source=name,
                       fix="pass a datasets.Dataset, a ray.data.Dataset, a list of dicts or a "
                           "JSON/JSONL/Parquet path")


def _columns(rows: Any) -> list[str]:
    if isinstance(rows, list):
        return list(dict.fromkeys(k for r in rows for k in r))
    return list(rows.column_names)


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
                        f"(alpaca)"], fix="rename the columns, or set sft.dataset_format / sft.text_field")


def _got(value: Any) -> str:
    # Arrow-backed sources (files, datasets.Dataset) fill a missing field with null, so the two read
    # the same whatever the source.
    return "the field is missing or null" if value is _MISSING or value is None else f"got {value!r:.80}"


def _row_problems(i: int, row: dict, fmt: str, text_field: str) -> list[str]:
    def nonempty_str(v: Any) -> bool:
        return isinstance(v, str) and v.strip() != ""

    if fmt == "text":
        v = row.get(text_field, _MISSING)
        return [] if nonempty_str(v) else [f"row {i}: field '{text_field}': expected a non-empty string, "
                                           f"{_got(v)}"]
    if fmt == "alpaca":
        out = []
        for key in ("instruction", "output"):
            v = row.get(key, _MISSING)
            if not nonempty_str(v):
                out.append(f"row {i}: field '{key}': expected a non-empty string, {_got(v)}")
        if row.get("input") is not None and not isinstance(row.get("input"), str):
            out.append(f"row {i}: field 'input': expected a string or null, got {row.get('input')!r:.80}")
        return out
    msgs = row.get("messages", _MISSING)
    if not isinstance(msgs, list) or not msgs:
        return [f"row {i}: field 'messages': expected a non-empty list of {{role, content}} turns, {_got(msgs)}"]
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            out.append(f"row {i}: field 'messages[{j}]': expected a {{role, content}} mapping, got {m!r:.80}")
            continue
        if m.get("role") not in ROLES:
            out.append(f"row {i}: field 'messages[{j}].role': expected one of {', '.join(ROLES)}, "
                       f"{_got(m.get('role', _MISSING))}")
        if not isinstance(m.get("content"), str):
            out.append(f"row {i}: field 'messages[{j}].content': expected a string, "
                       f"{_got(m.get('content', _MISSING))}")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" and nonempty_str(m.get("content"))
               for m in msgs):
        out.append(f"row {i}: field 'messages': expected at least one assistant turn with non-empty "
                   f"content to learn from")
    return out


def check_rows(ds, fmt: str, text_field: str = "text", cap: int = MAX_REPORTED_PROBLEMS,
               source: str = "dataset") -> None:
    """Raise DatasetError listing bad rows (the first `cap` of them, and how many in all).
    `ds`: a datasets.Dataset or a list of dicts."""
    problems: list[str] = []
    total = 0
    if len(ds) == 0:
        raise DatasetError(["the dataset is empty (no rows)"], source=source, fix="add rows")
    for i, row in enumerate(ds):
        found = _row_problems(i, row, fmt, text_field)
        total += len(found)
        problems.extend(found[: max(0, cap - len(problems))])
    if total:
        raise DatasetError(problems, total=total, source=source)


def _features(fmt: str):
    """The normalized columns' types, given explicitly: inferred ones would carry every key any
    source row had (a turn's `name`, `tool_calls`...) into every turn as None."""
    import datasets

    s = datasets.Value("string")
    if fmt == "text":
        return datasets.Features({"text": s})
    if fmt == "messages":
        return datasets.Features({"messages": datasets.List({"role": s, "content": s})})
    return datasets.Features({"prompt": s, "completion": s})


def normalize_row(row: dict, fmt: str, text_field: str = "text") -> dict:
    """One checked row in TRL's columns for `fmt`: text | messages | prompt + completion."""
    if fmt == "text":
        return {"text": row[text_field]}
    if fmt == "messages":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
    template = ALPACA_PROMPT_WITH_INPUT if (row.get("input") or "").strip() else ALPACA_PROMPT
    return {"prompt": template.format(instruction=row["instruction"], input=row.get("input") or ""),
            "completion": row["output"]}


def normalize(ds, fmt: str, text_field: str = "text"):
    """A datasets.Dataset holding only the columns TRL needs for `fmt` (from a Dataset or a list)."""
    import datasets

    if isinstance(ds, list):
        return datasets.Dataset.from_list([normalize_row(r, fmt, text_field) for r in ds],
                                          features=_features(fmt))
    return ds.map(normalize_row, fn_kwargs={"fmt": fmt, "text_field": text_field},
                  remove_columns=ds.column_names, features=_features(fmt))


def chat_template_problem(tokenizer) -> str | None:
    """Why chat `messages` rows cannot train with the loss on assistant tokens only under this
    tokenizer, or None when they can.

    TRL's SFTTrainer (assistant_only_loss, trl/trainer/sft_trainer.py) takes the assistant tokens from
    the chat template's {% generation %} markers; a template without them is swapped for TRL's
    training version of a known family (trl.chat_template_utils.get_training_chat_template), and any
    other template raises inside every worker. This asks the same questions on the driver first.
    """
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named variants: TRL renders the default one
        template = template.get("default")
    if not template:
        return "the tokenizer has no chat template, which chat `messages` rows are rendered with"
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(template):
        return None
    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        return ("the tokenizer's chat template has no {% generation %} markers and TRL has no training "
                "version of it, so the assistant tokens (the only ones trained) cannot be found")
    return None


def check_chat_template(tokenizer, model: str = "the model") -> None:
    """Raise DatasetError when chat rows cannot train under `model`'s tokenizer (chat_template_problem)."""
    problem = chat_template_problem(tokenizer)
    if problem:
        raise DatasetError([problem], source=f"chat data for {model}",
                           fix="use a chat model's tokenizer whose template marks assistant turns with "
                               "{% generation %}...{% endgeneration %} (or set its chat_template so), or "
                               "give the rows as alpaca instruction/input/output or text")


@dataclass(frozen=True)
class PreparedData:
    dataset: Any  # datasets.Dataset with normalized columns
    format: str
    num_rows: int


def prepare(source: Any, fmt: str = "auto", text_field: str = "text", shuffle_seed: int | None = 0) -> PreparedData:
    """Load, check every row, normalize, shuffle once (the order every rank's shard is cut from)."""
    name = _source_name(source)
    rows = load_rows(source)
    if len(rows) == 0:
        raise DatasetError(["the dataset is empty (no rows)"], source=name, fix="add rows")
    fmt = detect_format(_columns(rows), fmt, text_field)
    check_rows(rows, fmt, text_field, source=name)
    ds = normalize(rows, fmt, text_field)
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
