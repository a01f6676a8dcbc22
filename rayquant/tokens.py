"""Every row tokenized on the driver, with the model's tokenizer and chat template, into what the
workers train on: `input_ids` and `labels` (-100 where no loss is taken), cut at seq_len, and with
packing, packed into seq_len-token rows.

Tokenizing once on the driver, before Ray starts, is what lets a dry run say what a run will train
on: which rows keep no trainable token at this seq_len (a prompt longer than seq_len leaves no
completion; a chat template that marks no assistant turn leaves nothing), how many are cut, and
what seq_len would keep them. The workers then take their shards of these very rows (TRL's own
preparation is skipped: `dataset_kwargs={"skip_prepare_dataset": True}`), so what was checked is
what trains, on every rank alike.

The rows are built as TRL's SFTTrainer builds them (trl/trainer/sft_trainer.py, _prepare_dataset),
with TRL's own helpers:
- text:     the text plus EOS; every token is trained;
- alpaca:   prompt + completion + EOS; the completion is trained (TRL's completion_only_loss: the
            completion starts where the tokenized prompt and prompt+completion part, TRL's
            common_prefix_length);
- messages: the chat template's rendering; the assistant tokens are trained (TRL's
            assistant_only_loss: the template's {% generation %} markers, else TRL's training
            version of a known template family).
Then cut at seq_len (keep the start, TRL's default truncation_mode). A token counts as trainable
when the loss reads it: labels[1:] (the model predicts token t from the tokens before it), which is
what transformers' shifted loss and TRL's padding-free collator (no loss on a packed sequence's
first token) both take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from rayquant.data import DatasetError, PreparedData, check_chat_template

IGNORE = -100
MAX_LISTED_ROWS = 10
PACKING_STRATEGY = "bfd"  # TRL's best-fit decreasing: sequences stay whole (padding-free)


@dataclass(frozen=True)
class TokenizedData:
    """The rows the workers train on (or evaluate), and what tokenizing them at seq_len found.
    Row positions (`truncated`, `dropped`, `sources`) index the PreparedData it was made from."""

    dataset: Any  # datasets.Dataset: input_ids, labels (+ seq_lengths when packed)
    seq_len: int
    packed: bool
    rows: int  # rows tokenized
    truncated: tuple[int, ...]  # rows cut at seq_len that still have a trainable token
    dropped: tuple[int, ...]  # rows with no trainable token at seq_len: left out
    unmarked: tuple[int, ...]  # of `dropped`: rows the chat template marks no assistant token in
    needed_seq_len: int | None  # the seq_len that keeps every dropped row (None: none, or no length would)
    sources: tuple[tuple[int, ...], ...]  # per dataset row, the rows it holds (several when packed)
    trainable: tuple[int, ...]  # per dataset row, its trainable tokens
    tokens: int  # tokens of the kept rows after the cut

    @property
    def num_rows(self) -> int:
        """Rows of the dataset (packed rows when packed)."""
        return len(self.sources)

    @property
    def trainable_tokens(self) -> int:
        return sum(self.trainable)

    def shard_stats(self, indices: Sequence[int]) -> dict[str, int]:
        """What a shard of these rows (positions in `dataset`) holds: rows, source rows, rows cut at
        seq_len, trainable tokens."""
        truncated = set(self.truncated)
        source_rows = [s for i in indices for s in self.sources[i]]
        return {"rows": len(indices), "source_rows": len(source_rows),
                "truncated_rows": sum(1 for s in source_rows if s in truncated),
                "trainable_tokens": sum(self.trainable[i] for i in indices)}

    def _in_source_order(self, data: PreparedData) -> list[int]:
        return sorted(self.dropped, key=lambda k: data.source_rows[k] if data.source_rows else k)

    def summary(self, data: PreparedData, listed: int = MAX_LISTED_ROWS) -> dict[str, Any]:
        """For the manifest and `--dry-run --json`: counts, and the first dropped rows by name."""
        return {"rows": self.rows, "seq_len": self.seq_len, "kept_rows": self.rows - len(self.dropped),
                "truncated_rows": len(self.truncated), "dropped_rows": len(self.dropped),
                "dropped": [data.label(k) for k in self._in_source_order(data)[:listed]],
                "dropped_unmarked_by_template": len(self.unmarked),
                "seq_len_keeping_every_row": self.needed_seq_len,
                "tokens": self.tokens, "trainable_tokens": self.trainable_tokens,
                "packed": self.packed, "packed_rows": self.num_rows if self.packed else None}

    def dropped_text(self, data: PreparedData, listed: int = MAX_LISTED_ROWS) -> str:
        """Which rows keep no trainable token, why, and what keeps them (one paragraph)."""
        names = ", ".join(data.label(k) for k in self._in_source_order(data)[:listed])
        more = f" and {len(self.dropped) - listed} more" if len(self.dropped) > listed else ""
        cut = [k for k in self.dropped if k not in set(self.unmarked)]
        parts = []
        if cut:
            parts.append(f"{len(cut)} keep no trainable token within {{sft.seq_len}} {self.seq_len} (the "
                         f"prompt fills it)" + (f"; {{sft.seq_len}} >= {self.needed_seq_len} keeps them"
                                                if self.needed_seq_len else ""))
        if self.unmarked:
            parts.append(f"{len(self.unmarked)} have no assistant token the chat template marks with "
                         "{% generation %}")
        return (f"{len(self.dropped)} of {self.rows} rows of {data.source} train nothing ({names}{more}): "
                + "; ".join(parts))


def training_chat_template(tokenizer) -> str | None:
    """The template TRL renders chat rows with for assistant-only loss: None for the tokenizer's own
    (it has {% generation %} markers), else TRL's training version of a known family. Raises
    DatasetError when there is neither (rayquant.data.check_chat_template)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    check_chat_template(tokenizer, getattr(tokenizer, "name_or_path", "the model"))
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return None if has_generation_markers(template) else get_training_chat_template(tokenizer)


def tokenize_row(row: dict, fmt: str, tokenizer, chat_template: str | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one normalized row (rayquant.data.normalize_row), uncut."""
    from trl.data_utils import _tokenize, common_prefix_length

    eos = tokenizer.eos_token or ""
    if fmt == "text":
        text = row["text"] if row["text"].endswith(eos) else row["text"] + eos
        ids = _tokenize(tokenizer, text)["input_ids"]
        return ids, list(ids)
    if fmt == "alpaca":
        completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
        prompt_ids = _tokenize(tokenizer, row["prompt"])["input_ids"]
        ids = _tokenize(tokenizer, row["prompt"] + completion)["input_ids"]
        n = common_prefix_length(prompt_ids, ids)
        return ids, [IGNORE] * n + ids[n:]
    out = _tokenize(tokenizer, row["messages"], return_assistant_tokens_mask=True,
                    chat_template=chat_template, tools=None)
    ids = list(out["input_ids"])
    return ids, [i if m else IGNORE for i, m in zip(ids, out["assistant_masks"])]


def _first_trainable(labels: Sequence[int]) -> int | None:
    """Position of the first token the loss reads (labels[1:]), or None."""
    return next((i for i in range(1, len(labels)) if labels[i] != IGNORE), None)


def tokenize(data: PreparedData, tokenizer, seq_len: int, packing: bool = False,
             seed: int = 0) -> TokenizedData:
    """Tokenize every row of `data` (in its order), cut at `seq_len`, leave out the rows with no
    trainable token (listed in the result: a caller decides whether that is fatal), and with
    `packing`, pack the rest into seq_len-token rows (TRL's pack_dataset, best-fit decreasing),
    shuffled with `seed` so global batches do not run from the longest rows to the shortest."""
    import datasets

    template = training_chat_template(tokenizer) if data.format == "messages" else None
    ids_out, labels_out, sources, trainable = [], [], [], []
    truncated, dropped, unmarked, needed = [], [], [], []
    tokens = 0
    for k, row in enumerate(data.dataset):
        ids, labels = tokenize_row(row, data.format, tokenizer, template)
        first = _first_trainable(labels)
        if first is None or first >= seq_len:
            dropped.append(k)
            if first is not None:
                needed.append(first + 1)
            elif data.format == "messages":
                unmarked.append(k)
            continue
        if len(ids) > seq_len:
            truncated.append(k)
            ids, labels = ids[:seq_len], labels[:seq_len]
        ids_out.append(ids)
        labels_out.append(labels)
        sources.append((k,))
        trainable.append(sum(1 for t in labels[1:] if t != IGNORE))
        tokens += len(ids)
    if not ids_out:
        dataset = datasets.Dataset.from_dict({"input_ids": [], "labels": []},
                                             features=_features(packed=False))
    elif packing:
        dataset, sources, trainable = _pack(ids_out, labels_out, seq_len, seed)
    else:
        dataset = datasets.Dataset.from_dict({"input_ids": ids_out, "labels": labels_out},
                                             features=_features(packed=False))
    return TokenizedData(dataset=dataset, seq_len=seq_len, packed=packing and bool(ids_out),
                         rows=data.num_rows, truncated=tuple(truncated), dropped=tuple(dropped),
                         unmarked=tuple(unmarked),
                         needed_seq_len=max(needed) if needed and not unmarked else None,
                         sources=tuple(sources), trainable=tuple(trainable), tokens=tokens)


def _features(packed: bool):
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    columns = {"input_ids": ids, "labels": ids}
    if packed:
        columns["seq_lengths"] = datasets.List(datasets.Value("int32"))
    return datasets.Features(columns)


def _pack(ids: list[list[int]], labels: list[list[int]], seq_len: int, seed: int):
    """(packed dataset, source rows per packed row, trainable tokens per packed row)."""
    import datasets
    import numpy as np
    from trl.data_utils import pack_dataset

    # A per-token column of row positions travels through packing beside the tokens, so each packed
    # row knows the rows it holds; it is dropped before the workers see the data.
    rows = [[k] * len(x) for k, x in enumerate(ids)]
    flat = datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "row": rows})
    packed = pack_dataset(flat, seq_len, PACKING_STRATEGY)
    packed = packed.select(np.random.default_rng(seed).permutation(len(packed)).tolist()).flatten_indices()
    sources = tuple(tuple(int(k) for k in dict.fromkeys(r)) for r in packed["row"])
    trainable = tuple(sum(_row_trainable(labels[k]) for k in srcs) for srcs in sources)
    return packed.remove_columns("row").cast(_features(packed=True)), sources, trainable


def _row_trainable(labels: Sequence[int]) -> int:
    return sum(1 for t in labels[1:] if t != IGNORE)


def require_trainable(tokenized: TokenizedData, data: PreparedData, what: str = "training") -> None:
    """Raise DatasetError when no row keeps a trainable token (the run would train nothing)."""
    if tokenized.num_rows:
        return
    fix = (f"raise {{sft.seq_len}} to at least {tokenized.needed_seq_len}, or shorten the prompts"
           if tokenized.needed_seq_len else
           "give rows with something to learn: an alpaca output, an assistant turn the chat template "
           "marks with {% generation %}, or text")
    raise DatasetError([f"no {what} row keeps a trainable token: " + tokenized.dropped_text(data)],
                       source=data.source, fix=fix)
