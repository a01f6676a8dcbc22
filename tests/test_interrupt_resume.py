"""Ctrl-C and resuming, from outside: `rayquant train` in a real subprocess, sent SIGINT (to its
whole process group, as a terminal's Ctrl-C is) once its first checkpoint line appears; then the
same run.name started again under changed settings.

What must hold: the interrupted command prints one line saying where the run stopped and how to
resume it, exits 130 without a traceback, and leaves no Ray process behind; a rerun that changes
what is trained (dataset, learning rate, seq_len, max_steps) is refused before Ray starts with the
fields that differ (exit 2); max_steps going up resumes with --resume-anyway, trains the new steps
from the checkpoint, and the manifest says so. Two Ray runs in all.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

STEPS = 20
MORE_STEPS = 24
_CLI = "from rayquant.cli import main; main()"


def _config(tmp, name="c.yaml", dataset="data.jsonl", learning_rate=5e-3, seq_len=128, max_steps=STEPS):
    path = tmp / name
    path.write_text(f"""model: rayquant/tiny-llama
dataset: {dataset}
lora:
  rank: 8
sft:
  seq_len: {seq_len}
  global_batch_size: 4
  learning_rate: {learning_rate}
  max_steps: {max_steps}
  logging_steps: 1
  quantization: nf4
  optimizer: adamw_8bit
scaling:
  num_workers: 2
run:
  name: ctrlc
  storage_path: {tmp / "runs"}
  checkpoint_every_steps: 2
  max_failures: 0
""")
    return str(path)


def _env(tmp):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, RAYQUANT_CACHE=str(tmp / "cache"),
                PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    import psutil

    tmp = tmp_path_factory.mktemp("ctrlc")
    (tmp / "data.jsonl").write_text(open("examples/data/tiny_alpaca.jsonl").read())
    proc = subprocess.Popen([sys.executable, "-c", _CLI, "train", _config(tmp)], cwd=tmp, env=_env(tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "[rayquant] checkpoint at step" in line:
            break
    ray_processes = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
    lines.extend(proc.stdout)
    proc.wait()
    # Processes Ray started for this command end with it (generous: they are polled, not timed).
    _, alive = psutil.wait_procs(ray_processes, timeout=120)
    (tmp / "output.txt").write_text("".join(lines))  # for a look when an assertion below fails
    return {"tmp": tmp, "rc": proc.returncode, "output": "".join(lines), "ray_processes": ray_processes,
            "alive": alive}


@pytest.mark.ray
def test_ctrl_c_says_where_the_run_stopped_and_exits_130(interrupted):
    out = interrupted["output"]
    assert "[rayquant] checkpoint at step 2" in out
    assert interrupted["rc"] == 130, out[-3000:]
    assert "Traceback" not in out and "Aborted!" not in out, out[-3000:]
    stopped = [x for x in out.splitlines() if x.startswith("[rayquant] interrupted")]
    run_dir = interrupted["tmp"] / "runs" / "ctrlc"
    assert len(stopped) == 1 and re.fullmatch(
        rf"\[rayquant\] interrupted: run ctrlc stopped; its last checkpoint is step \d+, "
        rf"in {re.escape(str(run_dir))}\. "
        r"To resume it, run the same command again \(same run\.name\)\.", stopped[0]), stopped
    assert interrupted["ray_processes"] and not interrupted["alive"], interrupted["alive"]


def _stopped_step(interrupted) -> int:
    return int(re.search(r"its last checkpoint is step (\d+)", interrupted["output"]).group(1))


@pytest.mark.ray
def test_a_rerun_that_changes_the_training_is_refused_naming_the_fields(interrupted):
    tmp = interrupted["tmp"]
    rows = open("examples/data/tiny_alpaca.jsonl").read().splitlines()
    (tmp / "other.jsonl").write_text("\n".join(rows[:-3] + [json.dumps({"instruction": "say hi", "input": "",
                                                                        "output": "hi"})] * 3) + "\n")
    cfg = _config(tmp, "changed.yaml", dataset="other.jsonl", learning_rate=1e-3, seq_len=96, max_steps=30)
    out = subprocess.run([sys.executable, "-c", _CLI, "train", cfg, "--resume-anyway"], cwd=tmp, env=_env(tmp),
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-3000:]
    err = out.stderr
    assert "Traceback" not in err
    assert f"has a checkpoint at step {_stopped_step(interrupted)} written under other settings" in err
    for shown in ("dataset (its tokenized rows)", "sft.learning_rate: 0.005 -> 0.001", "sft.seq_len: 128 -> 96",
                  f"sft.max_steps: {STEPS} -> 30"):
        assert shown in err, err
    assert "To fix: choose another run.name" in err
    assert "[rayquant] training" not in out.stdout  # refused before Ray started

    more = _config(tmp, "more.yaml", max_steps=MORE_STEPS)  # only max_steps up: safe, but asked for
    out = subprocess.run([sys.executable, "-c", _CLI, "train", more], cwd=tmp, env=_env(tmp),
                         capture_output=True, text=True)
    assert out.returncode == 2 and f"sft.max_steps: {STEPS} -> {MORE_STEPS}" in out.stderr, out.stderr[-3000:]
    assert "set --resume-anyway to continue this run under them" in out.stderr


@pytest.mark.ray
def test_max_steps_up_with_resume_anyway_trains_the_new_steps(interrupted):
    tmp = interrupted["tmp"]
    step = _stopped_step(interrupted)
    out = subprocess.run([sys.executable, "-c", _CLI, "train", _config(tmp, "more.yaml", max_steps=MORE_STEPS),
                          "--resume-anyway"], cwd=tmp, env=_env(tmp), capture_output=True, text=True)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    manifest = json.loads((tmp / "runs" / "ctrlc" / "adapter" / "manifest.json").read_text())
    assert [w["resumed_from_step"] for w in manifest["workers"]] == [step, step]
    assert [w["steps"] for w in manifest["workers"]] == [MORE_STEPS, MORE_STEPS]
    assert manifest["loss"]["points"] == MORE_STEPS  # the loss curve spans the interruption
    assert manifest["loss"]["curve"][0][0] == 1 and manifest["loss"]["curve"][-1][0] == MORE_STEPS
    assert manifest["run"]["resumed_with_changes"] == [
        {"field": "sft.max_steps", "before": STEPS, "after": MORE_STEPS, "at_step": step}]
    assert manifest["sft"]["max_steps"] == MORE_STEPS
