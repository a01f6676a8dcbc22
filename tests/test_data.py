"""Datasets: loading, row checks with the promised error, formats, and rank shards."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayquant.data import (DatasetError, check_rows, detect_format, load_rows, prepare, shard_indices,
                           steps_per_epoch)


@settings(max_examples=60, deadline=None)
@given(per_rank=st.lists(st.integers(1, 6), min_size=1, max_size=5), num_rows=st.integers(0, 200))
def test_shards_are_disjoint_proportional_and_step_aligned(per_rank, num_rows):
    steps = steps_per_epoch(num_rows, per_rank)
    shards = [shard_indices(num_rows, per_rank, r) for r in range(len(per_rank))]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == steps * sum(per_rank)
    assert all(0 <= i < num_rows for i in flat)
    for r, shard in enumerate(shards):
        assert len(shard) == steps * per_rank[r]  # same number of steps, share = samples per step
        for s in range(steps):  # step s of every rank comes from global batch s
            rows = shard[s * per_rank[r]:(s + 1) * per_rank[r]]
            assert all(s * sum(per_rank) <= i < (s + 1) * sum(per_rank) for i in rows)


def test_shard_rank_out_of_range():
    with pytest.raises(ValueError, match="rank 2"):
        shard_indices(10, [1, 1], 2)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_rows_are_all_reported_with_row_field_and_expectation(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "b"},
            {"instruction": "", "input": "", "output": "b"},
            {"instruction": "a", "input": 3, "output": None}]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DatasetError) as e:
        prepare(path)
    text = str(e.value)
    assert "3 problems" in text
    # a JSON Lines file's rows are named by their line, from 1
    assert "line 2: field 'instruction': expected a non-empty string" in text
    assert "line 3: field 'output': expected a non-empty string, the field is missing or null" in text
    assert "line 3: field 'input': expected a string or null, got 3" in text
    assert "To fix" in text


def test_rows_are_numbered_the_way_their_source_counts_them(tmp_path):
    """JSONL: the file's line (blank lines count, as an editor shows them); anything else: row N from
    1 (a JSON array's Nth object, a Parquet file's Nth row, a list's Nth item)."""
    import datasets

    good, bad = {"text": "fine"}, {"text": ""}
    (tmp_path / "d.jsonl").write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n\n\n" + json.dumps(bad) + "\n")
    (tmp_path / "d.json").write_text(json.dumps([good, good, bad]))
    datasets.Dataset.from_list([good, good, bad]).to_parquet(str(tmp_path / "d.parquet"))
    for src, name in ((str(tmp_path / "d.jsonl"), "line 6"), (str(tmp_path / "d.json"), "row 3"),
                      (str(tmp_path / "d.parquet"), "row 3"), ([good, good, bad], "row 3"),
                      (datasets.Dataset.from_list([good, good, bad]), "row 3")):
        with pytest.raises(DatasetError) as e:
            prepare(src)
        assert e.value.problems == [f"{name}: field 'text': expected a non-empty string, got ''"], src


def test_chat_rows_are_checked_turn_by_turn():
    import datasets

    ds = datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "bot", "content": "hi"}, {"role": "user", "content": "x"}]},
    ])
    with pytest.raises(DatasetError) as e:
        check_rows(ds, "messages")
    text = str(e.value)
    assert "row 2: field 'messages[0].role': expected one of system, user, assistant, tool, got 'bot'" in text
    assert "row 2: field 'messages': expected at least one assistant turn" in text


def test_problem_list_is_capped_but_counted():
    ds = [{"text": ""} for _ in range(50)]
    with pytest.raises(DatasetError) as e:
        check_rows(load_rows(ds), "text", cap=5)
    assert len(e.value.problems) == 5 and "50 problems" in str(e.value) and "45 more" in str(e.value)


def test_formats_detected_and_normalized(tmp_path):
    assert detect_format(["messages"]) == "messages"
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["body"], text_field="body") == "text"
    with pytest.raises(DatasetError, match="cannot tell the format"):
        detect_format(["foo"])
    alpaca = prepare("examples/data/tiny_alpaca.jsonl", shuffle_seed=None)
    assert alpaca.format == "alpaca" and alpaca.num_rows == 192
    row = alpaca.dataset[2]
    assert set(row) == {"prompt", "completion"}
    assert "### Input:\ncat dog" in row["prompt"] and row["completion"] in ("cat", "dog")
    chat = prepare("examples/data/tiny_chat.jsonl")
    assert chat.format == "messages" and chat.dataset.column_names == ["messages"]
    text = prepare([{"body": "hello"}, {"body": "world"}], text_field="body")
    assert text.dataset.column_names == ["text"] and sorted(text.dataset["text"]) == ["hello", "world"]


def test_parquet_and_unsupported_files(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "a b"}, {"text": "c"}]).to_parquet(str(tmp_path / "d.parquet"))
    assert prepare(str(tmp_path / "d.parquet")).num_rows == 2
    (tmp_path / "d.csv").write_text("text\na\n")
    with pytest.raises(DatasetError, match="unsupported extension"):
        load_rows(str(tmp_path / "d.csv"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(DatasetError, match="line 2 is not valid JSON"):
        load_rows(str(tmp_path / "broken.jsonl"))


def test_fit_reports_bad_rows_before_any_worker_starts(tmp_path):
    import sys

    from rayquant.trainer import RayQuantTrainer

    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": 7}])
    trainer = RayQuantTrainer(model="rayquant/tiny-llama", dataset=path, run={"storage_path": str(tmp_path)})
    with pytest.raises(DatasetError, match="line 2: field 'text'"):
        trainer.fit()
    if not ray_was_up:
        assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


# -- every source gives the trainer the same rows ---------------------------------------------------

ROWS = {
    "text": [{"text": f"the {w} model learns", "id": i} for i, w in enumerate(["cat", "dog", "sun", "moon"])],
    "alpaca": [{"instruction": "how many", "input": "sun sun", "output": "two"},
               {"instruction": "which one is the cat", "input": None, "output": "cat"},
               {"instruction": "what colour is the red apple", "input": "", "output": "the apple is red"}],
    # extra keys (a turn's name, a row id) are dropped, not carried into every turn as None
    "messages": [{"id": 0, "messages": [{"role": "system", "content": "be brief", "name": "sys"},
                                        {"role": "user", "content": "how many sun"},
                                        {"role": "assistant", "content": "one"}]},
                 {"id": 1, "messages": [{"role": "user", "content": "which one is the dog"},
                                        {"role": "assistant", "content": "dog"},
                                        {"role": "user", "content": "and the cat"},
                                        {"role": "assistant", "content": "cat"}]}],
}


def _write_source(kind: str, rows: list[dict], tmp_path):
    """`rows` as the dataset kind a user would pass."""
    import datasets

    if kind == "list":
        return rows
    if kind == "hf":
        return datasets.Dataset.from_list(rows)
    if kind == "jsonl":
        return _write_jsonl(tmp_path / "d.jsonl", rows)
    if kind == "json":
        (tmp_path / "d.json").write_text(json.dumps(rows, indent=1))
        return str(tmp_path / "d.json")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    return str(tmp_path / "d.parquet")


def _expected(fmt: str, rows: list[dict]) -> list[dict]:
    """What TRL should receive, written out from the row contract (not through rayquant.data)."""
    if fmt == "text":
        return [{"text": r["text"]} for r in rows]
    if fmt == "messages":
        return [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]}
                for r in rows]
    out = []
    for r in rows:
        prompt = f"### Instruction:\n{r['instruction']}\n\n"
        if r.get("input"):
            prompt += f"### Input:\n{r['input']}\n\n"
        out.append({"prompt": prompt + "### Response:\n", "completion": r["output"]})
    return out


SOURCE_KINDS = ("list", "hf", "jsonl", "json", "parquet")


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_every_source_gives_the_same_rows(fmt, tmp_path):
    expected = _expected(fmt, ROWS[fmt])
    shuffled = None
    for kind in SOURCE_KINDS:
        src = _write_source(kind, ROWS[fmt], tmp_path)
        unshuffled = prepare(src, shuffle_seed=None)
        assert unshuffled.format == fmt and unshuffled.num_rows == len(expected), kind
        assert unshuffled.dataset.to_list() == expected, kind
        # the order the ranks' shards are cut from is the same whatever the source
        rows = prepare(src, shuffle_seed=3).dataset.to_list()
        assert sorted(map(json.dumps, rows)) == sorted(map(json.dumps, expected)), kind
        shuffled = rows if shuffled is None else shuffled
        assert rows == shuffled, kind


# Bad rows each typed source can hold (Parquet and datasets.Dataset columns have one type).
BAD_TYPED = {
    "text": ([{"text": "ok"}, {"text": ""}, {"text": None}],
             ["row 2: field 'text': expected a non-empty string, got ''",
              "row 3: field 'text': expected a non-empty string, the field is missing or null"]),
    "alpaca": ([{"instruction": "a", "input": "", "output": "b"}, {"instruction": " ", "input": "", "output": None}],
               ["row 2: field 'instruction': expected a non-empty string, got ' '",
                "row 2: field 'output': expected a non-empty string, the field is missing or null"]),
    "messages": ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                  {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": ""}]},
                  {"messages": []}],
                 ["row 2: field 'messages[0].role': expected one of system, user, assistant, tool, got 'bot'",
                  "row 2: field 'messages': expected at least one assistant turn with non-empty content",
                  "row 3: field 'messages': expected a non-empty list of {role, content} turns, got []"]),
}
# Bad rows only untyped sources can hold: a field whose type changes from row to row (Arrow would
# refuse the column; the user must hear the row instead).
BAD_MIXED = {
    "text": ([{"text": "ok"}, {"text": 7}, {"body": "x"}],
             ["row 2: field 'text': expected a non-empty string, got 7",
              "row 3: field 'text': expected a non-empty string, the field is missing or null"]),
    "alpaca": ([{"instruction": "a", "input": 3, "output": "b"}, {"instruction": ["a"], "output": "b"}],
               ["row 1: field 'input': expected a string or null, got 3",
                "row 2: field 'instruction': expected a non-empty string, got ['a']"]),
    "messages": ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                  {"messages": "hello"},
                  {"messages": [{"role": "user", "content": 5}, {"content": "x"}, "assistant: hi"]}],
                 ["row 2: field 'messages': expected a non-empty list of {role, content} turns, got 'hello'",
                  "row 3: field 'messages[0].content': expected a string, got 5",
                  "row 3: field 'messages[1].role': expected one of system, user, assistant, tool, "
                  "the field is missing or null",
                  "row 3: field 'messages[2]': expected a {role, content} mapping, got 'assistant: hi'",
                  "row 3: field 'messages': expected at least one assistant turn"]),
}


def _problems(src, fmt) -> list[str]:
    with pytest.raises(DatasetError) as e:
        prepare(src, fmt=fmt)
    assert "To fix" in str(e.value) and "Traceback" not in str(e.value)
    return e.value.problems


@pytest.mark.parametrize("fmt", sorted(BAD_TYPED))
def test_bad_rows_give_the_same_error_from_every_source(fmt, tmp_path):
    for table, kinds in ((BAD_TYPED, SOURCE_KINDS), (BAD_MIXED, ("list", "jsonl", "json"))):
        rows, want = table[fmt]
        for kind in kinds:
            got = _problems(_write_source(kind, rows, tmp_path), fmt)
            assert len(got) == len(want), (kind, got)
            for g, w in zip(got, want):
                # the same row, named as its source counts it: a JSONL file's line N is row N here
                assert g.startswith(w.replace("row ", "line ", 1) if kind == "jsonl" else w), (kind, g, w)


def test_file_and_source_errors_say_what_and_how_to_fix(tmp_path):
    import datasets

    cases = {}
    (tmp_path / "empty.jsonl").write_text("\n\n")
    cases[str(tmp_path / "empty.jsonl")] = "the dataset is empty"
    (tmp_path / "empty.json").write_text("[]")
    cases[str(tmp_path / "empty.json")] = "the dataset is empty"
    datasets.Dataset.from_dict({"text": []}).to_parquet(str(tmp_path / "empty.parquet"))
    cases[str(tmp_path / "empty.parquet")] = "the dataset is empty"
    cases[str(tmp_path / "missing.jsonl")] = "the file does not exist"
    (tmp_path / "dir.jsonl").mkdir()
    cases[str(tmp_path / "dir.jsonl")] = "doesn't contain any data files"  # a data directory, empty
    (tmp_path / "d.txt").write_text("hello\n")
    cases[str(tmp_path / "d.txt")] = "unsupported extension '.txt'; use .json, .jsonl or .parquet"
    (tmp_path / "broken.json").write_text('[{"text": "a"},\n {"text": }]')
    cases[str(tmp_path / "broken.json")] = "not valid JSON at line 2, column 11"
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n["b"]\n')
    cases[str(tmp_path / "rows.jsonl")] = "line 2 is a JSON list, expected an object"
    (tmp_path / "not.parquet").write_text("hello")
    cases[str(tmp_path / "not.parquet")] = "could not be read as parquet"
    for src, needle in cases.items():
        with pytest.raises(DatasetError) as e:
            prepare(src)
        assert needle in str(e.value) and str(e.value).startswith(f"{src} has 1 problem"), str(e.value)
        assert "To fix: " in str(e.value)
    for src, needle in (([], "the dataset is empty"), (datasets.Dataset.from_dict({"text": []}), "empty"),
                        ([{"text": "a"}, "b"], "row 2: expected a mapping of fields"),
                        ({"text": "a"}, "unsupported dataset type dict"),
                        (datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": "a"}]),
                                               "dev": datasets.Dataset.from_list([{"text": "b"}])}),
                         "has splits test, dev and none is named train")):
        with pytest.raises(DatasetError, match=needle):
            prepare(src)


@pytest.mark.ray
def test_ray_data_gives_the_same_rows_and_errors(tmp_path):
    """ray.data from Python rows, JSONL and Parquet: the rows and bad-row errors the other sources give
    (one small local Ray, shut down after unless one was already up)."""
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        for fmt, rows in ROWS.items():
            want = prepare(rows).dataset.to_list()
            jsonl = _write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
            parquet = _write_source("parquet", rows, tmp_path)
            for name, ds in (("items", ray.data.from_items(rows)), ("read_json", ray.data.read_json(jsonl)),
                             ("read_parquet", ray.data.read_parquet(parquet))):
                got = prepare(ds)
                assert got.format == fmt and got.dataset.to_list() == want, (fmt, name)
        for table in (BAD_TYPED, BAD_MIXED):
            for fmt, (rows, want) in table.items():
                got = _problems(ray.data.from_items(rows), fmt)
                assert [g[:len(w)] for g, w in zip(got, want)] == want and len(got) == len(want), got
        with pytest.raises(DatasetError, match="Ray Data dataset has 1 problem:\n  - the dataset is empty"):
            prepare(ray.data.from_items([{"text": "a"}]).limit(0))
    finally:
        ctx.enable_progress_bars = bars
        if started:
            ray.shutdown()


# -- the loss each format trains on, through the SFTTrainer the worker builds ---------------------------

CHAT = "examples/data/tiny_chat.jsonl"


@pytest.fixture(scope="module")
def sft_setup(tiny_llama_dir):
    """The tiny llama loaded as a one-worker CPU plan says (Unsloth, 4-bit, adamw_8bit), and a builder
    of rayquant.worker.sft.make_sft_trainer over a dataset (what each Ray worker builds, minus Ray)."""
    import unsloth  # noqa: F401  (patches transformers/TRL first, as the worker does)

    from rayquant.loading import load_for_training
    from rayquant.trainer import RayQuantTrainer

    def build(dataset, steps: int = 2, learning_rate: float = 1e-2, model=None, tokenizer=None, packing=False):
        import dataclasses
        import tempfile

        from rayquant.contract import SftSettings
        from rayquant.tokens import tokenize
        from rayquant.worker.sft import make_sft_trainer

        rq = RayQuantTrainer(model=str(tiny_llama_dir), dataset=dataset, lora={"rank": 8, "alpha": 16},
                             sft={"seq_len": 128, "global_batch_size": 8, "learning_rate": learning_rate,
                                  "max_steps": steps, "logging_steps": 1, "quantization": "nf4",
                                  "optimizer": "adamw_8bit", "packing": packing},
                             scaling={"num_workers": 1})
        plan = rq.plan()
        node = plan.node_plans[0]
        # one process takes the whole global batch, as the benchmark's direct run does
        node = dataclasses.replace(node, gradient_accumulation_steps=plan.global_batch_size // node.micro_batch_size)
        if model is None:
            model, tokenizer, _ = load_for_training(str(tiny_llama_dir), node, plan.job, device_map={"": "cpu"})
        data = rq.prepare_data()
        # the rows as the driver tokenizes them (rayquant.tokens), what every worker trains on
        tokens = tokenize(data, tokenizer, plan.job.seq_len, packing=packing)
        settings = SftSettings.from_options(rq.options.sft, max_steps=steps, seq_len=plan.job.seq_len,
                                            dataset_format=data.format)
        trainer, _ = make_sft_trainer(model, tokenizer, tokens.dataset, node, settings, tempfile.mkdtemp())
        return trainer, data

    trainer, _ = build(CHAT)  # loads the model once for the label tests
    return build, trainer.model, trainer.processing_class


def _batches(trainer):
    """Every batch the trainer's dataloader hands the model in one pass (what the loss sees)."""
    return list(trainer.get_train_dataloader())


def _trained_and_not(tok, batch):
    """Per row: (ids, trained mask) over the non-padding tokens."""
    out = []
    for ids, labels, attn in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        keep = attn.bool()
        ids, labels = ids[keep].tolist(), labels[keep].tolist()
        assert all(lab in (i, -100) for i, lab in zip(ids, labels))  # labels are the ids, or ignored
        out.append((ids, [lab != -100 for lab in labels]))
    return out


def test_chat_loss_covers_assistant_tokens_only(sft_setup, tmp_path):
    build, model, tok = sft_setup
    rows = [json.loads(line) for line in open(CHAT)] + ROWS["messages"]
    trainer, data = build(_write_jsonl(tmp_path / "chat.jsonl", rows), model=model, tokenizer=tok)
    assert data.format == "messages"
    start = tok.convert_tokens_to_ids("<|assistant|>")
    end = tok.eos_token_id  # the template closes every turn with <|end|>, inside {% generation %}
    seen = 0
    by_text = {tok.apply_chat_template(r["messages"], tokenize=False): r for r in data.dataset}
    for batch in _batches(trainer):
        for ids, trained in _trained_and_not(tok, batch):
            # expected from the token stream alone: after an <|assistant|> tag, up to and including
            # the <|end|> that closes the turn; the tag itself and every other turn are not trained
            want, inside = [], False
            for i in ids:
                want.append(inside)
                if i == start:
                    inside = True
                elif i == end:
                    inside = False
            assert trained == want
            row = by_text[tok.decode(ids)]
            assistant = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
            assert tok.decode([i for i, t in zip(ids, trained) if t]) == "".join(a + tok.eos_token for a in assistant)
            seen += 1
    assert seen == len(rows)  # every row reached the model (none dropped as fully masked)


def test_alpaca_loss_covers_the_output_only_and_text_every_token(sft_setup, tmp_path):
    build, model, tok = sft_setup
    trainer, data = build("examples/data/tiny_alpaca.jsonl", model=model, tokenizer=tok)
    by_prompt = {r["prompt"] + r["completion"]: r for r in data.dataset}
    seen = 0
    for batch in _batches(trainer):
        for ids, trained in _trained_and_not(tok, batch):
            n = trained.index(True)
            assert all(trained[n:]), "the completion is one trained span running to the end"
            row = by_prompt[tok.decode(ids[:-1])]
            assert tok.decode(ids[:n]) == row["prompt"]
            assert tok.decode(ids[n:]) == row["completion"] + tok.eos_token
            seen += 1
    assert seen == data.num_rows

    texts = [{"text": f"the {w} model learns to answer questions about ray clusters"} for w in _WORDS_8]
    trainer, data = build(texts, model=model, tokenizer=tok)
    decoded = []
    for batch in _batches(trainer):
        for ids, trained in _trained_and_not(tok, batch):
            assert all(trained)
            decoded.append(tok.decode(ids))
    assert sorted(decoded) == sorted(t["text"] + tok.eos_token for t in texts)


_WORDS_8 = ("cat", "dog", "sun", "moon", "apple", "pear", "red", "blue")


def _masked_and_unmasked_ce(trainer, batch):
    """(trainer's compute_loss, CE over the trained labels, CE over every token) on one batch."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, dict(batch)))
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    masked = float(F.cross_entropy(flat, batch["labels"][:, 1:].reshape(-1), ignore_index=-100))
    every = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:]
    return loss, masked, float(F.cross_entropy(flat, every.reshape(-1), ignore_index=-100))


def test_chat_training_in_process_lowers_the_masked_loss(sft_setup):
    """Train a fresh model a few steps on chat data through the worker's trainer: the loss falls, and
    the loss it computes (Unsloth's, as the worker runs it) is cross-entropy over the assistant labels
    only, not over every token: the mask reaches the loss."""
    build, _, _ = sft_setup
    trainer, _ = build(CHAT, steps=12, learning_rate=1e-2)
    batch = _batches(trainer)[0]
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 and losses[-1] < losses[0]
    trainer.model.eval()
    loss, masked, unmasked = _masked_and_unmasked_ce(trainer, batch)
    assert loss == pytest.approx(masked, rel=1e-3)
    assert abs(masked - unmasked) > 0.02 * masked  # told apart well beyond that tolerance


def test_chat_template_check_predicts_what_trl_refuses(sft_setup):
    """A template without {% generation %} that TRL cannot patch is refused by TRL; the driver's
    tokenization (what every worker trains on) refuses it with chat_template_problem's reason,
    before Ray starts."""
    import copy

    from trl.chat_template_utils import get_training_chat_template

    from rayquant.data import chat_template_problem, check_chat_template

    build, model, tok = sft_setup
    assert chat_template_problem(tok) is None
    check_chat_template(tok)
    unmarked = copy.deepcopy(tok)
    unmarked.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert "no {% generation %} markers" in chat_template_problem(unmarked)
    with pytest.raises(ValueError, match="not training-compatible"):
        get_training_chat_template(unmarked)
    with pytest.raises(DatasetError, match="no {% generation %} markers"):
        build(CHAT, model=model, tokenizer=unmarked)
    with pytest.raises(DatasetError, match="chat data for tiny has 1 problem") as e:
        check_chat_template(unmarked, "tiny")
    assert "To fix: use a chat model's tokenizer" in str(e.value)
    untemplated = copy.deepcopy(tok)
    untemplated.chat_template = None
    assert "has no chat template" in chat_template_problem(untemplated)


def test_packed_rows_keep_their_masks_and_attend_only_to_themselves(sft_setup):
    """sft.packing: rows packed on the driver reach the model as one padding-free row per micro-batch
    (position_ids restart per sequence, no attention mask); each sequence keeps its completion-only
    mask and its first token is not trained; and the model, as the worker loads it on CPU, keeps the
    sequences apart: the packed loss is the sum of the sequences' own losses, unlike a plain causal
    pass over the same tokens."""
    import torch

    build, model, tok = sft_setup
    trainer, data = build("examples/data/tiny_alpaca.jsonl", model=model, tokenizer=tok, packing=True)
    by_text = {r["prompt"] + r["completion"]: r for r in data.dataset}
    batch = _batches(trainer)[0]
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape[0] == 1
    ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3  # several rows share the micro-batch
    segments = list(zip(starts, starts[1:] + [len(ids)]))
    for s, e in segments:
        seg_ids, trained = ids[s:e].tolist(), (labels[s:e] != -100).tolist()
        assert not trained[0]  # no loss on a packed sequence's first token
        n = trained.index(True)
        assert all(trained[n:]) and not any(trained[:n])
        row = by_text[tok.decode(seg_ids[:-1])]
        assert tok.decode(seg_ids[:n]) == row["prompt"]
        assert tok.decode(seg_ids[n:]) == row["completion"] + tok.eos_token

    def loss_sum(**kw):
        return float(model(**kw, num_items_in_batch=1, use_cache=False).loss)

    model.eval()
    with torch.no_grad():
        packed = loss_sum(input_ids=ids[None], position_ids=pos[None], labels=labels[None])
        alone = sum(loss_sum(input_ids=ids[None, s:e], labels=labels[None, s:e]) for s, e in segments)
        mixed = loss_sum(input_ids=ids[None], labels=labels[None])  # one causal sequence: they mix
    model.train()
    assert packed == pytest.approx(alone, rel=2e-2)
    assert abs(mixed - alone) > 5 * abs(packed - alone)


def test_eval_loss_is_token_weighted_over_every_row(sft_setup):
    """rayquant.worker.evaluation: the eval loss is the mean over every eval token (not a mean of
    per-batch means), however the rows fall into batches."""
    import torch
    import torch.nn.functional as F

    from rayquant.tokens import tokenize
    from rayquant.worker.evaluation import Evaluation

    build, model, tok = sft_setup
    trainer, data = build(CHAT, model=model, tokenizer=tok)
    rows = tokenize(data, tok, 128).dataset.select(range(7))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for r in rows:
            logits = model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits.float()
            target = torch.tensor(r["labels"][1:])
            total += float(F.cross_entropy(logits[0, :-1], target, ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    model.train()
    for batch_size in (1, 3, 7):
        evaluation = Evaluation(rows, -(-7 // batch_size), batch_size, tok.pad_token_id)
        loss, tokens = evaluation.loss(trainer)
        assert tokens == count and loss == pytest.approx(total / count, rel=1e-3)
        assert trainer.model.training  # left as it was
