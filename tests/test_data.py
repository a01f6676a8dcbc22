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
    assert "row 1: field 'instruction': expected a non-empty string" in text
    assert "row 2: field 'output': expected a non-empty string, got None" in text
    assert "row 2: field 'input': expected a string or null, got 3" in text
    assert "To fix" in text


def test_chat_rows_are_checked_turn_by_turn():
    import datasets

    ds = datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "bot", "content": "hi"}, {"role": "user", "content": "x"}]},
    ])
    with pytest.raises(DatasetError) as e:
        check_rows(ds, "messages")
    text = str(e.value)
    assert "row 1: field 'messages[0].role': expected one of system, user, assistant, tool, got 'bot'" in text
    assert "row 1: field 'messages': expected at least one assistant turn" in text


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
    with pytest.raises(DatasetError, match="row 1: field 'text'"):
        trainer.fit()
    if not ray_was_up:
        assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
