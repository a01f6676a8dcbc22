"""What `rayquant train --dry-run` (and fit(), before Ray starts) checks: every row tokenized at
seq_len, the batch against the rows, the chat template, host RAM, the tracking packages; and what
makes a finished run a failure (it trained nothing)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import pytest
from click.testing import CliRunner

from rayquant.cli import main

LONG = "which one is the cat " * 6  # an instruction of ~70 tokens with the alpaca prompt around it


def _config(tmp_path, rows, **sections) -> str:
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = {"seq_len": 64, "global_batch_size": 4, **sections.pop("sft", {})}
    body = {"model": "rayquant/tiny-llama", "dataset": "d.jsonl", "sft": sft, "scaling": {"num_workers": 2},
            "run": {"storage_path": str(tmp_path / "runs"), **sections.pop("run", {})}, **sections}
    (tmp_path / "c.yaml").write_text(json.dumps(body))  # JSON is YAML
    return str(tmp_path / "c.yaml")


def test_a_run_whose_every_row_loses_its_completion_is_refused_before_ray(tmp_path, monkeypatch):
    """Issue 14: alpaca prompts longer than seq_len left every row masked; the dry run said all rows
    were fine and the run exited 0 with `Loss nan -> nan` and an all-zero adapter. Now the dry run
    and fit() name the rows, why, and the seq_len that keeps them, and nothing trains."""
    monkeypatch.setenv("RAYQUANT_CACHE", str(tmp_path / "cache"))
    rows = [{"instruction": LONG, "input": "", "output": "cat"} for _ in range(12)]
    config = _config(tmp_path, rows)
    out = CliRunner().invoke(main, ["train", config, "--dry-run"])
    assert out.exit_code == 2 and "Traceback" not in out.output, out.output
    assert "no training row keeps a trainable token: 12 of 12 rows" in out.output
    assert "(line 1, line 2, line 3" in out.output and "and 2 more" in out.output
    assert "12 keep no trainable token within sft.seq_len 64 (the prompt fills it)" in out.output
    need = int(out.output.split("sft.seq_len >= ")[1].split()[0])
    assert need > 64 and f"To fix: raise sft.seq_len to at least {need}" in out.output

    import ray

    from rayquant.data import DatasetError
    from rayquant.trainer import RayQuantTrainer

    was_up = ray.is_initialized()
    trainer = RayQuantTrainer(model="rayquant/tiny-llama", dataset=str(tmp_path / "d.jsonl"),
                              sft={"seq_len": 64, "global_batch_size": 4},
                              run={"storage_path": str(tmp_path / "runs")})
    with pytest.raises(DatasetError, match='raise sft={"seq_len": ...} to at least'):
        trainer.fit()
    assert ray.is_initialized() == was_up and not (tmp_path / "runs").exists()
    # at the seq_len it names, every row trains
    out = CliRunner().invoke(main, ["train", _config(tmp_path, rows, sft={"seq_len": need}), "--dry-run"])
    assert out.exit_code == 0 and "12 rows train" in out.output, out.output


def test_rows_left_out_are_named_and_the_batch_is_checked_against_what_is_left(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYQUANT_CACHE", str(tmp_path / "cache"))
    short = {"instruction": "which one is the cat", "input": "", "output": "cat"}
    long = {"instruction": LONG, "input": "", "output": "cat"}
    out = CliRunner().invoke(main, ["train", _config(tmp_path, [short] * 8 + [long] * 2), "--dry-run", "--json"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    train = got["dataset"]["train"]
    assert (train["rows"], train["kept_rows"], train["dropped_rows"]) == (10, 8, 2)
    assert train["dropped"] == ["line 9", "line 10"] and train["seq_len_keeping_every_row"] > 64
    assert sum(r["source_rows"] for r in got["dataset"]["per_rank"]) == 8
    assert "2 of 10 rows" in got["warnings"][0] and "they are left out" in got["warnings"][0]
    # what is left must fill one global batch
    out = CliRunner().invoke(main, ["train", _config(tmp_path, [short] * 3 + [long] * 2), "--dry-run"])
    assert out.exit_code == 2, out.output
    assert "the dataset gives 3 rows (2 of 5 left out: they train nothing), fewer than one global batch of 4" \
        in out.output and "sft.global_batch_size" in out.output


def test_chat_rows_under_a_template_that_marks_nothing_are_refused(tmp_path, monkeypatch, tiny_llama_dir):
    """A template without {% generation %} markers that TRL cannot patch fails the dry run (it
    failed inside every worker)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "cat"}]}] * 4
    path = _config(tmp_path, rows)
    body = json.loads(open(path).read())
    body["model"] = str(model)
    (tmp_path / "c.yaml").write_text(json.dumps(body))
    out = CliRunner().invoke(main, ["train", path, "--dry-run"])
    assert out.exit_code == 2 and "Traceback" not in out.output, out.output
    assert "no {% generation %} markers and TRL has no training version of it" in out.output


def test_tracking_packages_missing_are_skipped_with_a_message(tmp_path, monkeypatch):
    from rayquant.tracking import available, tracking_env

    monkeypatch.setenv("RAYQUANT_CACHE", str(tmp_path / "cache"))
    have_wandb = "wandb" in sys.modules or available(("wandb",))[0] == ("wandb",)
    usable, skipped = available(("tensorboard", "mlflow", "wandb"))
    assert usable[:2] == ("tensorboard", "mlflow")
    if not have_wandb:
        assert skipped == ["report_to: wandb skipped: its package (wandb) is not installed. "
                           "To use it: pip install wandb"]
        rows = [{"text": f"the cat {i}"} for i in range(8)]
        out = CliRunner().invoke(main, ["train", _config(tmp_path, rows, run={"report_to": ["wandb"]}), "--dry-run"])
        assert out.exit_code == 0 and "Warning: report_to: wandb skipped" in out.output, out.output
    env = tracking_env(("tensorboard", "mlflow"), tmp_path / "run", environ={"MLFLOW_TAGS": "{}", "PATH": "/bin"})
    assert env["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "run" / "tensorboard")
    assert env["MLFLOW_TRACKING_URI"] == (tmp_path / "run" / "mlruns").as_uri()
    assert env["MLFLOW_ALLOW_FILE_STORE"] == "true" and env["MLFLOW_TAGS"] == "{}" and "PATH" not in env
    server = tracking_env(("mlflow",), tmp_path, environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert server["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and "MLFLOW_ALLOW_FILE_STORE" not in server


def test_cpu_workers_that_together_exceed_the_nodes_ram_are_refused():
    """Issue 14: 2 workers x 15.3 GiB planned on a 23.5 GiB machine (each CPU worker's budget is the
    whole node's RAM, so the planner alone did not add them up)."""
    from planner.plan import JobSpec, MemoryBreakdown, NodePlan, TrainingPlan, WorkerAssignment
    from rayquant.preflight import GIB, host_ram_problems

    node = NodePlan(node_type="CPU:2", gpu="CPU", nodes=1, gpus_per_node=2, quantization="bf16",
                    compute_dtype="bfloat16", micro_batch_size=1, gradient_accumulation_steps=1,
                    optimizer="adamw_torch", gradient_checkpointing="none", placement="per-gpu",
                    backend="unsloth", workers_per_node=2, gpus_per_worker=1,
                    peak_memory_bytes=int(15.3 * GIB), memory_budget_bytes=int(21.2 * GIB),
                    breakdown=MemoryBreakdown(1, 1, 1, 1, 1, 1, 1), tokens_per_second=1.0, reasons={})
    plan = TrainingPlan(model="m", model_summary={}, job=JobSpec(), node_plans=(node,),
                        workers=(WorkerAssignment(0, "CPU:2", 0, 0), WorkerAssignment(1, "CPU:2", 0, 1)))
    (problem,) = host_ram_problems(plan, local_ram_bytes=int(23.5 * GIB))
    assert "2 workers x 15.3 GiB planned = 30.6 GiB, more than the node's 21.2 GiB of RAM" in problem
    assert "{scaling.num_workers}" in problem
    fits = dataclasses.replace(node, peak_memory_bytes=8 * GIB)
    assert host_ram_problems(dataclasses.replace(plan, node_plans=(fits,)), int(23.5 * GIB)) == []
    assert host_ram_problems(dataclasses.replace(plan, node_plans=(fits,)), 12 * GIB)  # this machine's RAM


def _stats(**changes):
    from rayquant.contract import DeviceInfo, QuantizationReport, WorkerStats

    base = dict(rank=0, node_type="CPU:2", hostname="h", node_id="n", device=DeviceInfo("cpu", "CPU", cpus=2),
                placement="per-gpu", engine="DistributedDataParallel",
                quantization=QuantizationReport("nf4", "nf4", {}, {}), optimizer_planned="adamw_8bit",
                optimizer_used="AdamW8bit", micro_batch_size=1, gradient_accumulation_steps=1, shard_rows=8,
                global_steps=4, resumed_from_step=None, trainable_parameters=10, adapter_dtype="float32",
                peak_memory_bytes=1, peak_memory_source="rss", predicted_peak_memory_bytes=1, train_s=1.0,
                tokens_per_s=1.0, predicted_tokens_per_s=1.0, losses=((1, 5.0), (2, 4.0)), adapter_sha256="0" * 64)
    return WorkerStats(**{**base, **changes})


def test_a_run_that_trained_nothing_is_a_failed_run():
    from rayquant.adapters import GatheredAdapters
    from rayquant.cli.errors import kind_of
    from rayquant.trainer import TrainedNothingError, check_trained

    def gathered(*stats):
        return GatheredAdapters(adapter_dir=None, worker_stats=stats, sha256="0" * 64)

    check_trained(gathered(_stats(), _stats(rank=1)))  # a run that trained
    for stats, needle in (((_stats(global_steps=0, losses=()),), "rank 0 took no optimizer step"),
                          ((_stats(losses=((1, math.nan), (2, math.nan))),), "not finite at step(s) 1, 2"),
                          ((_stats(stopped="the training loss was nan at step 3: stopped there"),),
                           "rank 0: the training loss was nan at step 3")):
        with pytest.raises(TrainedNothingError, match="no adapter was published") as e:
            check_trained(gathered(*stats), "/runs/r")
        assert needle in str(e.value) and kind_of(e.value) == "run"  # exit 1, a failed run


def test_training_stops_at_a_non_finite_loss_and_evaluates_at_the_last_step():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from rayquant.worker.evaluation import eval_batches, eval_slice, evaluation_callbacks

    guard, callbacks = evaluation_callbacks(object(), eval_steps=4, max_steps=10)
    args, state = TrainingArguments(output_dir="/tmp/unused", report_to=[]), TrainerState()
    control = TrainerControl()
    state.global_step = 3
    guard.on_log(args, state, control, logs={"loss": 2.0})
    assert not control.should_training_stop and guard.stopped is None
    guard.on_log(args, state, control, logs={"loss": float("nan")})
    assert control.should_training_stop and "the training loss was nan at step 3" in guard.stopped
    at_end = callbacks[1]
    for step, expected in ((8, False), (10, True)):  # 8 is on the schedule already; 10 is not
        control, state.global_step = TrainerControl(), step
        at_end.on_step_end(args, state, control)
        assert control.should_evaluate is expected
    # eval slices: contiguous, sizes within one; ZeRO-3 ranks run the same number of batches
    assert [eval_slice(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [eval_batches(10, [2, 1, 4], r, same_count=False) for r in range(3)] == [2, 3, 1]
    assert {eval_batches(10, [2, 1, 4], r, same_count=True) for r in range(3)} == {3}


def test_eval_progress_line():
    from rayquant.progress import format_eval

    assert format_eval(10, 40, 3.21449, 1234) == \
        "[rayquant] eval at step 10/40  eval_loss 3.2145 over 1,234 tokens"
