"""`rayquant train` through click's CliRunner (the dry run starts no Ray and loads no weights)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from rayquant.cli import main


def test_dry_run_prints_the_plan_and_checks_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYQUANT_CACHE", str(tmp_path / "cache"))
    out = CliRunner().invoke(main, ["train", "examples/quickstart.yaml", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "Plan for rayquant/tiny-llama: 2 worker(s)" in out.output
    assert "nf4" in out.output and "adamw_8bit" in out.output
    assert "192 rows, format alpaca, all rows OK" in out.output
    # every row tokenized with the tiny model's tokenizer (trained alone: no weights are built)
    assert "Tokenized with rayquant/tiny-llama's tokenizer at sft.seq_len 128: 192 rows train, 0 cut" in out.output
    assert "30 steps of 8 rows" in out.output
    assert not (tmp_path / "cache" / "models").exists()


def test_dry_run_json(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYQUANT_CACHE", str(tmp_path / "cache"))
    out = CliRunner().invoke(main, ["train", "examples/quickstart.yaml", "--dry-run", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["plan"]["num_workers"] == 2 and data["plan"]["global_batch_size"] == 8
    dataset = data["dataset"]
    assert (dataset["rows"], dataset["format"]) == (192, "alpaca")
    assert dataset["train"]["kept_rows"] == 192 and dataset["train"]["dropped_rows"] == 0
    assert dataset["train"]["trainable_tokens"] > 0 and not dataset["train"]["packed"]
    assert [r["rank"] for r in dataset["per_rank"]] == [0, 1] and data["steps"] == 30
    assert data["model"]["source"] == "tiny" and data["model"]["context_length"] == 512
    assert data["warnings"] == []


def test_bad_config_lists_every_problem_without_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: rayquant/tiny-llama\ndataset: missing.jsonl\nsft: {optimizer: sgd, seq_len: 0}\n"
                   "extra: 1\n")
    out = CliRunner().invoke(main, ["train", str(cfg), "--dry-run"])
    assert out.exit_code == 2
    assert "Traceback" not in out.output
    for needle in ("4 problems", "missing.jsonl does not exist", "sft.optimizer must be one of", "sft.seq_len",
                   "'extra' is not a config key"):
        assert needle in out.output


def test_bad_rows_exit_cleanly(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: rayquant/tiny-llama\ndataset: d.jsonl\n")
    out = CliRunner().invoke(main, ["train", str(cfg), "--dry-run"])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert "line 1: field 'messages': expected at least one assistant turn" in out.output


def _config_for(tmp_path, dataset_name: str) -> str:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: rayquant/tiny-llama\ndataset: {dataset_name}\n")
    return str(cfg)


def test_dry_run_lists_bad_rows_of_every_file_format(tmp_path):
    import datasets

    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "hi"}]}]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    datasets.Dataset.from_list(chat).to_parquet(str(tmp_path / "chat.parquet"))
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    for name in ("chat.json", "chat.parquet", "chat.jsonl"):
        for extra in ([], ["--json"]):
            out = CliRunner().invoke(main, ["train", _config_for(tmp_path, name), "--dry-run", *extra])
            assert out.exit_code == 2 and "Traceback" not in out.output, (name, out.output)
            assert f"{tmp_path / name} has 2 problems" in out.output
            row = "line" if name.endswith(".jsonl") else "row"  # as the file counts its rows, from 1
            assert f"{row} 2: field 'messages[0].role': expected one of system, user, assistant, tool, got 'bot'" \
                in out.output
            assert f"{row} 3: field 'messages': expected at least one assistant turn" in out.output
            assert "To fix: correct or drop these rows" in out.output and '"plan"' not in out.output


def test_dry_run_caps_the_row_listing_and_reports_file_problems(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "b"}] + [{"instruction": "a", "input": i} for i in range(30)]
    (tmp_path / "many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = CliRunner().invoke(main, ["train", _config_for(tmp_path, "many.jsonl"), "--dry-run"])
    assert out.exit_code == 2 and "Traceback" not in out.output
    listed = [line for line in out.output.splitlines() if line.startswith("  - line ")]
    assert len(listed) == 20 and "60 problems" in out.output and "... and 40 more" in out.output
    assert "line 2: field 'output': expected a non-empty string, the field is missing or null" in out.output
    assert "line 2: field 'input': expected a string or null, got 0" in out.output

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b",}\n')
    for name, needle in (("empty.jsonl", "the dataset is empty"), ("broken.jsonl", "line 2 is not valid JSON")):
        out = CliRunner().invoke(main, ["train", _config_for(tmp_path, name), "--dry-run"])
        assert out.exit_code == 2 and "Traceback" not in out.output and needle in out.output, out.output
