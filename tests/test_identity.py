"""A run's identity (rayquant.identity): what a resumed run is compared against before Ray starts.
The end-to-end case (a real interrupted run, changed, rerun with the same run.name) is in
tests/test_interrupt_resume.py."""

from __future__ import annotations

import dataclasses
import json

import pytest

from planner.plan import JobSpec, MemoryBreakdown, NodePlan, TrainingPlan, WorkerAssignment
from rayquant.config import SftOptions, python_spelling, yaml_spelling
from rayquant.identity import (IDENTITY_FILE, ResumeMismatchError, check_resume, differences, last_checkpoint_step,
                               rows_sha256, run_identity)


def _plan(micro=(2, 1), accum=(2, 3), seq_len=128) -> TrainingPlan:
    job = JobSpec(seq_len=seq_len, global_batch_size=7, lora_rank=8, lora_alpha=16)
    nodes = tuple(NodePlan(node_type=f"CPU:{k}", gpu="CPU", nodes=1, gpus_per_node=1, quantization="nf4",
                           compute_dtype="bfloat16", micro_batch_size=m, gradient_accumulation_steps=a,
                           optimizer="adamw_8bit", gradient_checkpointing="unsloth", placement="per-gpu",
                           backend="unsloth", workers_per_node=1, gpus_per_worker=1, peak_memory_bytes=1,
                           memory_budget_bytes=2, breakdown=MemoryBreakdown(1, 1, 1, 1, 1, 1, 1),
                           tokens_per_second=1.0, reasons={})
                  for k, (m, a) in enumerate(zip(micro, accum)))
    workers = (WorkerAssignment(0, "CPU:0", 0, 0), WorkerAssignment(1, "CPU:1", 0, 0))
    return TrainingPlan("tiny", {}, job, nodes, workers)


def _rows(n=20, shift=0):
    import datasets

    ids = [[i + shift] * (3 + i % 4) for i in range(n)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def _identity(plan=None, sft=None, steps=10, rows=None):
    return run_identity(model="rayquant/tiny-llama", plan=plan or _plan(), sft=sft or SftOptions(),
                        total_steps=steps, data_format="alpaca", train_rows=rows if rows is not None else _rows())


def _checkpointed(run_dir, step, registered=True):
    """A checkpoint directory as Ray Train leaves it; `registered`: its manager's snapshot names it."""
    name = f"checkpoint_2026-12-01_10-00-0{step}.000000"
    state = run_dir / name / "checkpoint" / "rayquant_state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"global_step": step, "data_position_rows": step * 7, "world_size": 2, "losses": []}))
    if registered:
        (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(
            {"latest_checkpoint_result": {"checkpoint_dir_name": name, "metrics": {"checkpoint_step": step}}}))


def test_rows_hash_follows_content_not_chunking():
    import datasets

    rows = _rows()
    assert rows_sha256(rows) == rows_sha256(datasets.concatenate_datasets([rows.select(range(7)),
                                                                          rows.select(range(7, 20))]))
    back = list(reversed(range(20)))
    assert rows_sha256(rows) == rows_sha256(rows.select(back).select(back))  # an indices mapping, flattened
    assert rows_sha256(rows) != rows_sha256(_rows(shift=1))
    assert rows_sha256(rows) != rows_sha256(rows.select(range(19)))
    assert rows_sha256(None) is None


def test_a_first_start_writes_the_identity_and_an_unchanged_rerun_resumes(tmp_path):
    ident = _identity()
    assert check_resume(tmp_path, "r", ident, resume_anyway=False) == []
    assert json.loads((tmp_path / IDENTITY_FILE).read_text()) == ident
    _checkpointed(tmp_path, 4)
    _checkpointed(tmp_path, 6, registered=False)  # written as the run stopped: Ray does not resume from it
    assert last_checkpoint_step(tmp_path) == 4
    assert check_resume(tmp_path, "r", _identity(), resume_anyway=False) == []


def test_changed_training_is_refused_naming_every_field(tmp_path):
    check_resume(tmp_path, "r", _identity(), resume_anyway=False)
    _checkpointed(tmp_path, 4)
    changed = _identity(plan=_plan(seq_len=96), sft=SftOptions(learning_rate=1e-3), steps=12, rows=_rows(shift=1))
    for anyway in (False, True):  # resume_anyway does not take changes that alter what was trained
        with pytest.raises(ResumeMismatchError) as err:
            check_resume(tmp_path, "r", changed, resume_anyway=anyway)
        text = err.value.render(yaml_spelling)
        for shown in ("sft.learning_rate: 0.0002 -> 0.001", "sft.seq_len: 128 -> 96", "sft.max_steps: 10 -> 12",
                      "dataset (its tokenized rows)", "checkpoint at step 4"):
            assert shown in text, text
        assert "To fix: choose another run.name" in text and "run.resume_anyway" not in text
        assert 'run={"name": ...}' in err.value.render(python_spelling)
    assert json.loads((tmp_path / IDENTITY_FILE).read_text()) == _identity()  # kept as it was


def test_max_steps_up_resumes_only_when_asked_and_is_recorded(tmp_path):
    check_resume(tmp_path, "r", _identity(steps=10), resume_anyway=False)
    _checkpointed(tmp_path, 4)
    with pytest.raises(ResumeMismatchError) as err:
        check_resume(tmp_path, "r", _identity(steps=20), resume_anyway=False)
    assert "set run.resume_anyway to continue" in err.value.render(yaml_spelling)
    assert "--resume-anyway" in err.value.render(lambda s: {"run.resume_anyway": "--resume-anyway"}.get(s, s))
    taken = check_resume(tmp_path, "r", _identity(steps=20), resume_anyway=True)
    assert taken == [{"field": "sft.max_steps", "before": 10, "after": 20, "at_step": 4}]
    written = json.loads((tmp_path / IDENTITY_FILE).read_text())
    assert written["sft"]["max_steps"] == 20 and written["resumed_with_changes"] == taken
    assert check_resume(tmp_path, "r", _identity(steps=20), resume_anyway=False) == []  # now the identity


def test_max_steps_down_and_new_numerics_are_refused_even_when_asked(tmp_path):
    check_resume(tmp_path, "r", _identity(steps=10), resume_anyway=False)
    _checkpointed(tmp_path, 4)
    with pytest.raises(ResumeMismatchError, match="sft.max_steps: 10 -> 8"):
        check_resume(tmp_path, "r", _identity(steps=8), resume_anyway=True)
    bf16 = _plan()
    bf16 = dataclasses.replace(bf16, node_plans=tuple(dataclasses.replace(n, quantization="bf16")
                                                      for n in bf16.node_plans))
    with pytest.raises(ResumeMismatchError, match="the plan's quantization: \"nf4\" -> \"bf16\""):
        check_resume(tmp_path, "r", _identity(plan=bf16), resume_anyway=True)


def test_another_split_of_the_global_batch_is_safe_under_ddp_only(tmp_path):
    check_resume(tmp_path, "r", _identity(), resume_anyway=False)
    _checkpointed(tmp_path, 4)
    resplit = _identity(plan=_plan(micro=(1, 1), accum=(2, 5)))  # rank 0: 4 -> 2 rows, rank 1: 3 -> 5
    with pytest.raises(ResumeMismatchError, match="the plan's samples_per_step of rank 0: 4 -> 2") as err:
        check_resume(tmp_path, "r", resplit, resume_anyway=False)
    assert "set run.resume_anyway" in err.value.render(yaml_spelling)
    assert "samples_per_step" in " ".join(c["field"] for c in check_resume(tmp_path, "r", resplit, True))

    zero = tmp_path / "zero3"
    zero3 = _plan()
    zero3 = dataclasses.replace(zero3, node_plans=tuple(dataclasses.replace(n, placement="zero3", backend="hf")
                                                        for n in zero3.node_plans))
    check_resume(zero, "r", _identity(plan=zero3), resume_anyway=False)
    _checkpointed(zero, 4)
    resplit3 = dataclasses.replace(zero3, node_plans=tuple(dataclasses.replace(n, micro_batch_size=1,
                                                                               gradient_accumulation_steps=a)
                                                           for n, a in zip(zero3.node_plans, (2, 5))))
    with pytest.raises(ResumeMismatchError, match="not resumable"):  # ZeRO-3 shards are per rank
        check_resume(zero, "r", _identity(plan=resplit3), resume_anyway=True)


def test_without_a_checkpoint_nothing_is_resumed_so_any_change_goes(tmp_path):
    check_resume(tmp_path, "r", _identity(), resume_anyway=False)
    other = _identity(sft=dataclasses.replace(SftOptions(), seed=3))
    assert check_resume(tmp_path, "r", other, resume_anyway=False) == []
    assert json.loads((tmp_path / IDENTITY_FILE).read_text()) == other
