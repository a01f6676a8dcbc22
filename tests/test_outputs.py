"""Outputs never replace what rayquant did not write: `-o`, `--plot`, `run.output_dir` refuse a
user's file or folder (exit 2, nothing touched) and replace a previous rayquant output only with
--overwrite."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from planner.atomic import OutputExistsError, check_output, has_signature
from rayquant.cli import main

REPO = Path(__file__).resolve().parents[1]
PLAN_ARGS = ["plan", "--model", "meta-llama/Llama-3.1-8B", "--gpus", "1x1xA10G"]


def _run(*args):
    return CliRunner().invoke(main, list(args))


def _user_project(root: Path) -> Path:
    proj = root / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("print('mine')\n")
    return proj


def _job(tmp_path: Path) -> Path:
    """The quickstart config with its dataset beside it, runs stored under tmp_path."""
    shutil.copytree(REPO / "examples" / "data", tmp_path / "data")
    cfg = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    cfg["run"]["storage_path"] = str(tmp_path / "runs")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("dry_run", [True, False])
def test_train_refuses_a_users_folder_before_training_and_keeps_it(tmp_path, monkeypatch, dry_run):
    # The reported loss: `rayquant train job.yaml -o proj` exited 0 and proj/src was gone.
    monkeypatch.setenv("RAYQUANT_CACHE", str(tmp_path / "cache"))
    proj = _user_project(tmp_path)
    for extra in ([], ["--overwrite"]):
        out = _run("train", str(_job_once(tmp_path)), "-o", str(proj), *extra,
                   *(["--dry-run"] if dry_run else []))
        assert out.exit_code == 2, out.output
        assert "not written by rayquant (it holds src/)" in out.output and "Traceback" not in out.output
    assert (proj / "src" / "main.py").read_text() == "print('mine')\n"
    assert not (tmp_path / "runs").exists()  # refused before Ray or any run directory


def _job_once(tmp_path: Path) -> Path:
    return tmp_path / "job.yaml" if (tmp_path / "job.yaml").exists() else _job(tmp_path)


def test_run_output_dir_in_the_config_is_guarded_the_same_way(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYQUANT_CACHE", str(tmp_path / "cache"))
    proj = _user_project(tmp_path)
    cfg = yaml.safe_load(_job(tmp_path).read_text())
    cfg["run"].update(output_dir=str(proj), overwrite=True)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    out = _run("train", str(tmp_path / "job.yaml"))
    assert out.exit_code == 2 and "not written by rayquant" in out.output, out.output
    assert (proj / "src" / "main.py").exists()


def test_plan_output_and_plot_refuse_user_files_and_need_overwrite_for_their_own(tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    out = _run(*PLAN_ARGS, "--json", "-o", str(notes))
    assert out.exit_code == 2 and "not written by rayquant" in out.output
    assert notes.read_text() == '{"mine": true}\n'

    plan = tmp_path / "plan.json"
    assert _run(*PLAN_ARGS, "-o", str(plan)).exit_code == 0
    assert has_signature(plan) and json.loads(plan.read_text())["written_by"] == "rayquant"
    again = _run(*PLAN_ARGS, "-o", str(plan))
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert _run(*PLAN_ARGS, "--seq-len", "1024", "-o", str(plan), "--overwrite").exit_code == 0
    assert json.loads(plan.read_text())["job"]["seq_len"] == 1024

    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n not ours")
    out = _run(*PLAN_ARGS, "--plot", str(photo))
    assert out.exit_code == 2 and photo.read_bytes().endswith(b"not ours")
    drawn = tmp_path / "memory.png"
    assert _run(*PLAN_ARGS, "--plot", str(drawn)).exit_code == 0 and has_signature(drawn)
    assert _run(*PLAN_ARGS, "--plot", str(drawn), "--overwrite").exit_code == 0


def test_k8s_output_refuses_a_users_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    mine = tmp_path / "deploy.yaml"
    mine.write_text("kind: Deployment\n")
    args = ["k8s", "--config", "k8s/train.yaml", "--gpus", "1x1xA10G", "--image", "img:1",
            "--storage", "pvc", "--hf-token-secret", "hf", "--dataset-in-pod", "/mnt/rayquant/train.jsonl"]
    out = _run(*args, "-o", str(mine), "--overwrite")
    assert out.exit_code != 0 and "not written by rayquant" in out.output
    assert mine.read_text() == "kind: Deployment\n"
    rendered = tmp_path / "rayjob.yaml"
    assert _run(*args, "-o", str(rendered)).exit_code == 0 and has_signature(rendered)
    assert _run(*args, "-o", str(rendered)).exit_code != 0
    assert _run(*args, "-o", str(rendered), "--overwrite").exit_code == 0


def test_check_output_rules(tmp_path):
    check_output(tmp_path / "new.json", overwrite=False, what="plan file")  # free
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", overwrite=False, what="adapter directory", directory=True)
    with pytest.raises(OutputExistsError, match="is a directory"):
        check_output(tmp_path / "empty", overwrite=True, what="plan file")
    mine = tmp_path / "mine.txt"
    mine.write_text("x")
    with pytest.raises(OutputExistsError, match="is a file, not a directory"):
        check_output(mine, overwrite=True, what="adapter directory", directory=True)
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(OutputExistsError, match="not written by rayquant"):
        check_output(tmp_path / "dangling", overwrite=True, what="plan file")
