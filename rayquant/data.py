"""Training data: load (HF Dataset, Ray Data, JSON/JSONL/Parquet, a local directory of data files,
a Hub dataset), check every row, normalize to one of TRL's formats, split off evaluation rows, and
shard by rank in proportion to each rank's samples per optimizer step.

Sources: a file (.json, .jsonl, .parquet); a local directory of data files (or a dataset repo
cloned locally: its README's `configs:` name the subsets) and a Hub dataset id (`org/name`), both
through `datasets.load_dataset` and its cache (HF_DATASETS_OFFLINE, HF_TOKEN), with a split
(default: train, or the only split) and a subset (the dataset's config name); a `datasets.Dataset`
or `DatasetDict`; a Ray Data dataset; a list of dicts.

Rows are numbered in errors the way the source counts them: `line N` (from 1) of a JSONL file,
`row N` (from 1) of anything else, so a JSON array's third object is row 3 and a Parquet file's
first row is row 1.

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

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from planner.vocab import SettingError

ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_PROBLEMS = 20
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
FILE_KINDS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ROW_FIX = ("correct or drop these rows (formats: text field, chat `messages`, or alpaca "
           "instruction/input/output)")
_MISSING = object()


class DatasetError(SettingError):
    """The data cannot be used: which rows, which fields, what was expected. Settings are named as
    {placeholders} (`{dataset_split}`, `{sft.seq_len}`), spelled by each face (rayquant.config)."""

    def __init__(self, problems: list[str], total: int | None = None, source: str = "dataset",
                 fix: str = ROW_FIX) -> None:
        from rayquant.config import render_options

        self.raw_problems = list(problems)
        self.problems = [render_options(p) for p in problems]
        self.fix = fix
        self.source = source
        total = len(self.problems) if total is None else total
        shown = "\n".join(f"  - {p}" for p in problems)
        more = f"\n  ... and {total - len(problems)} more" if total > len(problems) else ""
        self.template = (f"{source} has {total} problem{'s' if total != 1 else ''}:\n{shown}{more}\n"
                         f"To fix: {fix}.")
        ValueError.__init__(self, render_options(self.template))

    def render(self, spell: Callable[[str], str] | None = None) -> str:
        from rayquant.config import render_options

        return render_options(self.template, spell)


def _plain(value: Any) -> Any:
    """Python values from what Ray Data hands back (numpy arrays and scalars inside rows)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    return value


def _source_name(source: Any, split: str | None = None, subset: str | None = None) -> str:
    if isinstance(source, (str, os.PathLike)):
        name = os.path.expanduser(str(source))
        parts = [f"subset {subset}" if subset else "", f"split {split}" if split else ""]
        extra = ", ".join(p for p in parts if p)
        return f"{name} ({extra})" if extra else name
    if type(source).__module__.startswith("ray.data"):
        return "Ray Data dataset"
    return "dataset"


@dataclass(frozen=True)
class RowNumbering:
    """How a source's rows are named in messages: `line N` of a JSONL file (its lines, blank ones
    included, from 1), else `row N` (from 1)."""

    lines: tuple[int, ...] | None = None  # the file line of each row, for JSONL

    def label(self, index: int) -> str:
        """The row at 0-based position `index` of the loaded source, as the user counts it."""
        if self.lines is not None and 0 <= index < len(self.lines):
            return f"line {self.lines[index]}"
        return f"row {index + 1}"


def _jsonl_lines(path: str) -> tuple[int, ...] | None:
    """The line number of each row of a JSON Lines file (rows are its non-blank lines); None for a
    JSON array."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return None
    return tuple(n for n, line in enumerate(text.splitlines(), 1) if line.strip())


def row_numbering(source: Any) -> RowNumbering:
    """How rows of `source` are numbered in messages (RowNumbering)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.path.expanduser(str(source))
        if os.path.isfile(path) and os.path.splitext(path)[1].lower() in (".json", ".jsonl"):
            return RowNumbering(_jsonl_lines(path))
    return RowNumbering()


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


# The split taken when none is named, by role: training takes train (else the only split);
# evaluation takes validation, else test (else the only split).
DEFAULT_SPLITS = {"train": ("train",), "eval": ("validation", "valid", "val", "dev", "test")}


def pick_split(splits: Sequence[str], split: str | None, role: str = "train") -> str:
    """The split to read of `splits`: `split` when named, else the role's default (DEFAULT_SPLITS),
    else the only one. Raises DatasetError naming the splits there are."""
    key = "{eval_dataset_split}" if role == "eval" else "{dataset_split}"
    if split is not None:
        if split in splits:
            return split
        raise DatasetError([f"has no split {split!r}; its splits are {', '.join(splits)}"],
                           fix=f"name one of them with {key}")
    for name in DEFAULT_SPLITS[role]:
        if name in splits:
            return name
    if len(splits) == 1:
        return splits[0]
    raise DatasetError([f"has splits {', '.join(splits)} and none is named {' or '.join(DEFAULT_SPLITS[role])}"],
                       fix=f"name the split to use with {key}")


def _load_repo(path: str, split: str | None, subset: str | None, role: str, hub: bool):
    """A split of a local data directory or a Hub dataset, through datasets.load_dataset."""
    import datasets

    from rayquant.models import hub_error

    name = _source_name(path, split, subset)
    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_dataset(path, name=subset)
    except Exception as e:  # classified: the Hub's errors, a missing subset, a folder without data
        reason = hub_error(e, path, "dataset") if hub else None
        if reason is None and isinstance(e, (ValueError, FileNotFoundError,
                                             datasets.exceptions.DatasetNotFoundError)):
            reason = f"could not be loaded: {e}"
        if reason is None:
            raise
        if "onfig" in reason:
            fix = "name the subset with {dataset_subset} (the dataset's config name)"
        elif not hub:
            fix = ("put JSON, JSONL or Parquet files in the directory (train.jsonl, test.jsonl... name "
                   "the splits), or point {dataset} at one file")
        else:
            fix = "fix the id, split or subset as said above"
        raise DatasetError([reason], source=name, fix=fix) from None
    if isinstance(loaded, datasets.DatasetDict):
        try:
            chosen = pick_split(list(loaded), split, role)
        except DatasetError as e:
            raise DatasetError(e.raw_problems, source=name, fix=e.fix) from None
        return loaded[chosen]
    return loaded


def load_rows(source: Any, split: str | None = None, subset: str | None = None,
              role: str = "train") -> "datasets.Dataset | list[dict]":  # noqa: F821
    """The rows to check: a `datasets.Dataset` (from a Dataset, DatasetDict, file, data directory or
    Hub dataset), or a list of plain dicts (from a list of dicts or a Ray Data dataset; Ray Data is
    materialized on the driver, so its rows are checked before any worker starts, in the order Ray
    Data yields them). `split` and `subset` pick a DatasetDict's split and a Hub dataset's config;
    unnamed, the split is the role's default (pick_split)."""
    import datasets

    from rayquant.models import looks_like_hub_id

    name = _source_name(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.path.expanduser(str(source))
        if os.path.isdir(path) or (not os.path.exists(path) and looks_like_hub_id(str(source))):
            return _load_repo(path, split, subset, role, hub=not os.path.isdir(path))
    if subset is not None:
        raise DatasetError([f"the subset {subset!r} applies to a Hub dataset or a data directory, "
                            "not to this source"], source=name, fix="drop the subset")
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        try:
            return source[pick_split(list(source), split, role)]
        except DatasetError as e:
            raise DatasetError([f"DatasetDict {e.raw_problems[0]}"], source=name,
                               fix="pass the split, e.g. dataset=ds['<split>'], or name it") from None
    if split not in (None, "train"):
        raise DatasetError([f"a single file or list of rows has one split (train), not {split!r}"],
                           source=name, fix="drop the split, or pass a data directory or Hub dataset")
    if type(source).__module__.startswith("ray.data"):
        return [_plain(dict(row)) for row in source.take_all()]
    if isinstance(source, (list, tuple)):
        bad = [f"row {i + 1}: expected a mapping of fields (one dict per row), got {type(r).__name__} {r!r:.60}"
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


def _row_problems(i: str, row: dict, fmt: str, text_field: str) -> list[str]:
    def nonempty_str(v: Any) -> bool:
        return isinstance(v, str) and v.strip() != ""

    if fmt == "text":
        v = row.get(text_field, _MISSING)
        return [] if nonempty_str(v) else [f"{i}: field '{text_field}': expected a non-empty string, "
                                           f"{_got(v)}"]
    if fmt == "alpaca":
        out = []
        for key in ("instruction", "output"):
            v = row.get(key, _MISSING)
            if not nonempty_str(v):
                out.append(f"{i}: field '{key}': expected a non-empty string, {_got(v)}")
        if row.get("input") is not None and not isinstance(row.get("input"), str):
            out.append(f"{i}: field 'input': expected a string or null, got {row.get('input')!r:.80}")
        return out
    msgs = row.get("messages", _MISSING)
    if not isinstance(msgs, list) or not msgs:
        return [f"{i}: field 'messages': expected a non-empty list of {{role, content}} turns, {_got(msgs)}"]
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            out.append(f"{i}: field 'messages[{j}]': expected a {{role, content}} mapping, got {m!r:.80}")
            continue
        if m.get("role") not in ROLES:
            out.append(f"{i}: field 'messages[{j}].role': expected one of {', '.join(ROLES)}, "
                       f"{_got(m.get('role', _MISSING))}")
        if not isinstance(m.get("content"), str):
            out.append(f"{i}: field 'messages[{j}].content': expected a string, "
                       f"{_got(m.get('content', _MISSING))}")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" and nonempty_str(m.get("content"))
               for m in msgs):
        out.append(f"{i}: field 'messages': expected at least one assistant turn with non-empty "
                   f"content to learn from")
    return out


def check_rows(ds, fmt: str, text_field: str = "text", cap: int = MAX_REPORTED_PROBLEMS,
               source: str = "dataset", numbering: RowNumbering = RowNumbering()) -> None:
    """Raise DatasetError listing bad rows (the first `cap` of them, and how many in all), each named
    as `numbering` says. `ds`: a datasets.Dataset or a list of dicts."""
    problems: list[str] = []
    total = 0
    if len(ds) == 0:
        raise DatasetError(["the dataset is empty (no rows)"], source=source, fix="add rows")
    for i, row in enumerate(ds):
        found = _row_problems(numbering.label(i), row, fmt, text_field)
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
    source: str = "dataset"  # the source as messages name it
    # Position of each row in the loaded source (0-based), in the dataset's order (it is shuffled),
    # and how the source numbers its rows: row k here is numbering.label(source_rows[k]).
    source_rows: tuple[int, ...] = ()
    numbering: RowNumbering = RowNumbering()

    def label(self, k: int) -> str:
        """Row k of this dataset named as its source counts it (`line 7`, `row 3`)."""
        return self.numbering.label(self.source_rows[k] if self.source_rows else k)

    def select(self, positions: Sequence[int]) -> "PreparedData":
        """These rows (positions in this dataset), in this order, keeping their source numbering."""
        positions = list(positions)
        rows = self.source_rows or tuple(range(self.num_rows))
        return dataclasses.replace(self, dataset=self.dataset.select(positions).flatten_indices(),
                                   num_rows=len(positions), source_rows=tuple(rows[k] for k in positions))


def prepare(source: Any, fmt: str = "auto", text_field: str = "text", shuffle_seed: int | None = 0,
            split: str | None = None, subset: str | None = None, role: str = "train") -> PreparedData:
    """Load, check every row, normalize, shuffle once (the order every rank's shard is cut from;
    the permutation datasets' Dataset.shuffle(seed) draws)."""
    name = _source_name(source, split, subset)
    rows = load_rows(source, split, subset, role)
    if len(rows) == 0:
        raise DatasetError(["the dataset is empty (no rows)"], source=name, fix="add rows")
    fmt = detect_format(_columns(rows), fmt, text_field)
    numbering = row_numbering(source)
    check_rows(rows, fmt, text_field, source=name, numbering=numbering)
    data = PreparedData(dataset=normalize(rows, fmt, text_field), format=fmt, num_rows=len(rows),
                        source=name, source_rows=tuple(range(len(rows))), numbering=numbering)
    if shuffle_seed is not None:
        import numpy as np

        data = data.select(np.random.default_rng(shuffle_seed).permutation(data.num_rows).tolist())
    return data


def split_eval(data: PreparedData, fraction: float) -> tuple[PreparedData, PreparedData]:
    """(training rows, evaluation rows): the last round(fraction x rows) rows of the (shuffled)
    dataset, at least one, held out; deterministic for a seed. Raises DatasetError when no rows
    would be left to train on."""
    held = max(1, round(fraction * data.num_rows))
    if held >= data.num_rows:
        raise DatasetError([f"{{sft.eval_fraction}} {fraction} of {data.num_rows} rows leaves none to train on"],
                           source=data.source, fix="add rows, or lower {sft.eval_fraction}")
    keep = data.num_rows - held
    return data.select(range(keep)), data.select(range(keep, data.num_rows))


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
