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
    assert not (tmp_path / "cache" / "models").exists()


def test_dry_run_json(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYQUANT_CACHE", str(tmp_path / "cache"))
    out = CliRunner().invoke(main, ["train", "examples/quickstart.yaml", "--dry-run", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["plan"]["num_workers"] == 2 and data["plan"]["global_batch_size"] == 8
    assert data["dataset"] == {"path": data["dataset"]["path"], "rows": 192, "format": "alpaca"}


def test_bad_config_lists_every_problem_without_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: rayquant/tiny-llama\ndataset: missing.jsonl\nsft: {optimizer: sgd, seq_len: 0}\n"
                   "extra: 1\n")
    out = CliRunner().invoke(main, ["train", str(cfg), "--dry-run"])
    assert out.exit_code == 2
    assert "Traceback" not in out.output
    for needle in ("4 problems", "missing.jsonl does not exist", "sft.optimizer='sgd'", "sft.seq_len",
                   "'extra' is not a config key"):
        assert needle in out.output


def test_bad_rows_exit_cleanly(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: rayquant/tiny-llama\ndataset: d.jsonl\n")
    out = CliRunner().invoke(main, ["train", str(cfg), "--dry-run"])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert "row 0: field 'messages': expected at least one assistant turn" in out.output
