"""Exit codes and error messages, mapped in one place (rayquant.cli.errors): 2 for bad input with a
`To fix:` line, 1 for a failed run with where to look, 1 for a bug in rayquant said as such (its
traceback only with --verbose); settings spelled the way each face takes them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import planner
from planner.plan import PlanError
from rayquant.cli import main
from rayquant.cli.errors import VERBOSE_ENV

PLAN = ["plan", "-m", "meta-llama/Llama-3.1-8B", "--gpus", "1x1xA10G"]


@pytest.fixture(autouse=True)
def quiet(monkeypatch, tmp_path):
    # Set (not absent) so the variable `--verbose` sets is restored after each test either way.
    monkeypatch.setenv(VERBOSE_ENV, "0")
    monkeypatch.setenv("RAYQUANT_CACHE", str(tmp_path / "cache"))


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def _bug(*args, **kwargs):
    return 1 / 0


@pytest.mark.parametrize("args", [
    ["plan", "-m", "no-such/model", "--gpus", "A10G"],  # PlanError (unknown model)
    ["plan", "-m", "meta-llama/Llama-3.1-8B", "--gpus", "2xH999"],  # PlanError (unknown GPU)
    ["plan", "-m", "meta-llama/Llama-3.1-8B", "--inventory", "/no/such/inventory.yaml"],  # InventoryError
    ["plan", *PLAN[1:], "--calibration", "/no/such/cal.json"],  # CalibrationError
    ["plan", *PLAN[1:], "--json", "--yaml"],  # a usage error
    ["plan", *PLAN[1:], "--prefer", "fastest"],  # click's own check of a choice
    ["models", "--filter", "zzzz"],
    ["inventory", "--local", "--address", "head:6379"],
    ["train", "/no/such/job.yaml", "--dry-run"],  # ConfigError
    ["k8s", "--config", "/no/such/job.yaml", "--gpus", "T4", "--image", "i", "--storage", "pvc"],  # K8sError
], ids=["model", "unknown-gpu", "inventory", "calibration", "json-yaml", "choice", "models", "local-address",
        "config", "k8s-config"])
def test_bad_input_exits_2_with_a_fix_and_no_traceback(args):
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert _error_lines(result.output) and "Traceback" not in result.output
    assert "To fix" in result.output or "Invalid value" in result.output, result.output


def test_bad_data_exits_2(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "c.yaml").write_text("model: rayquant/tiny-llama\ndataset: d.jsonl\n")
    result = _run("train", str(tmp_path / "c.yaml"), "--dry-run")
    assert result.exit_code == 2 and "To fix:" in result.output and "Traceback" not in result.output


def test_a_failed_run_exits_1_and_says_where_to_look(tmp_path, monkeypatch):
    from ray.train import TrainingFailedError

    from rayquant.trainer import RayQuantTrainer

    def fail(self):
        raise TrainingFailedError("rank 1 died: CUDA error")

    monkeypatch.setattr(RayQuantTrainer, "fit", fail)
    result = _run("train", "examples/quickstart.yaml")
    assert result.exit_code == 1, result.output
    assert "Error: the run failed: TrainingFailedError: rank 1 died: CUDA error" in result.output
    assert "run.storage_path" in result.output and "/tmp/ray/session_latest/logs" in result.output
    assert "Traceback" not in result.output and "Internal error" not in result.output


def test_calibrate_measuring_nothing_is_a_failed_run(monkeypatch):
    from rayquant import calibrate

    monkeypatch.setattr(calibrate, "check_cuda", lambda: None)
    monkeypatch.setattr(calibrate, "run_cases", lambda cases, workdir, **kw: [
        {"label": c.label, "status": "error", "error": "CUDA out of memory"} for c in cases])
    monkeypatch.setattr(calibrate, "calibration_from", lambda results: planner.calibration.Calibration(()))
    result = _run("calibrate", "--model", "Qwen/Qwen2.5-0.5B", "--quantization", "nf4", "--seq-len", "64")
    assert result.exit_code == 1, result.output
    assert "Error: the run failed: no configuration could be measured" in result.output
    assert "table above" in result.output


@pytest.mark.parametrize("error", [ZeroDivisionError("division by zero"), ValueError("a bug, not input")],
                         ids=["ZeroDivisionError", "ValueError"])
def test_a_bug_is_an_internal_error_not_bad_input(monkeypatch, error):
    def bug(*args, **kwargs):
        raise error

    monkeypatch.setattr(planner, "make_plan", bug)
    result = _run(*PLAN)
    assert result.exit_code == 1, result.output
    assert f"Internal error (a bug in rayquant): {type(error).__name__}: {error}" in result.output
    assert not _error_lines(result.output)  # never dressed as the user's mistake
    assert "Traceback" not in result.output and "--verbose" in result.output


def test_verbose_shows_the_traceback_of_an_internal_error(monkeypatch):
    monkeypatch.setattr(planner, "make_plan", _bug)
    flag = _run("--verbose", *PLAN)
    assert flag.exit_code == 1 and "Traceback" in flag.output and "ZeroDivisionError" in flag.output
    assert "in _bug" in flag.output and not _error_lines(flag.output)
    assert os.environ[VERBOSE_ENV] == "0"  # set for the command only
    monkeypatch.setenv(VERBOSE_ENV, "1")
    env = _run(*PLAN)
    assert env.exit_code == 1 and "Traceback" in env.output


def test_the_entry_point_exits_with_the_mapped_status(tmp_path):
    """The installed script's path (rayquant.cli:main in a fresh process), not only CliRunner's."""
    code = "import sys; from rayquant.cli import main; sys.argv = ['rayquant', *sys.argv[1:]]; main()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    bad = subprocess.run([sys.executable, "-c", code, "plan", "-m", "no-such/model", "--gpus", "A10G"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("Error: ") and "Traceback" not in bad.stderr
    ok = subprocess.run([sys.executable, "-c", code, *PLAN, "--json"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and '"node_plans"' in ok.stdout


# -- each face spells the settings a message names its own way ------------------------------------

def _pin_error(*args, **kwargs):
    raise PlanError("nothing fits. To fix: lower {seq_len} or {global_batch_size}, or pin {gpus}")


def test_the_cli_spells_settings_as_its_flags(monkeypatch):
    monkeypatch.setattr(planner, "make_plan", _pin_error)
    result = _run(*PLAN)
    assert result.exit_code == 2
    assert "lower --seq-len or --global-batch, or pin --gpus" in result.output


def test_train_spells_settings_as_yaml_keys_and_its_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(planner, "make_plan", _pin_error)
    result = _run("train", "examples/quickstart.yaml", "--dry-run")
    assert result.exit_code == 2
    assert "lower sft.seq_len or sft.global_batch_size, or pin scaling.gpus" in result.output
    # An output setting the command takes as a flag is spelled as that flag.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text(
        '{"written_by": "rayquant", "files": ["adapter_config.json"]}')
    (tmp_path / "out" / "adapter_config.json").write_text("{}")
    again = _run("train", "examples/quickstart.yaml", "--dry-run", "-o", str(tmp_path / "out"))
    assert again.exit_code == 2 and "previous adapter directory" in again.output
    assert "add --overwrite to replace it" in again.output


def test_k8s_spells_config_settings_as_yaml_keys_and_its_flags_as_flags(monkeypatch):
    monkeypatch.setattr(planner, "make_plan", _pin_error)
    result = _run("k8s", "--config", "k8s/train.yaml", "--gpus", "T4", "--image", "i", "--storage", "pvc",
                  "--dataset-in-pod", "/d.jsonl")
    assert result.exit_code == 2
    assert "lower sft.seq_len or sft.global_batch_size, or pin --gpus" in result.output


def test_the_trainer_raises_with_python_spellings(monkeypatch, tmp_path):
    from rayquant.trainer import RayQuantTrainer

    monkeypatch.setattr(planner, "make_plan", _pin_error)
    trainer = RayQuantTrainer(model="rayquant/tiny-llama", dataset="examples/data/tiny_alpaca.jsonl")
    with pytest.raises(PlanError) as e:
        trainer.plan()
    assert str(e.value) == ('nothing fits. To fix: lower sft={"seq_len": ...} or '
                            'sft={"global_batch_size": ...}, or pin scaling={"gpus": ...}')
