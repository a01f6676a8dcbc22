"""Runs that survive faults (rayquant.restarts, RayQuantTrainer.fit): a worker out of memory is
re-planned one step cheaper and resumed from the last checkpoint; with nothing cheaper left the run
fails with the memory seen and what would fit.

The out-of-memory error is torch's own type, raised inside a worker by a user callback (a CPU run
cannot run out of memory on purpose). Two Ray runs share one local cluster.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys

import pytest
from transformers import TrainerCallback

DATA = "examples/data/tiny_alpaca.jsonl"
MAX_STEPS = 6
OOM_AT_STEP = 3
CHECKPOINT_EVERY = 2


class OutOfMemoryOnce(TrainerCallback):
    """Raise torch.OutOfMemoryError on `rank` at the end of `step`; once, if `marker` is given (the
    file says it happened), else every time."""

    def __init__(self, step: int, rank: int, marker: str | None = None) -> None:
        self.step, self.rank, self.marker = step, rank, marker

    def on_step_end(self, args, state, control, **kwargs):
        import pathlib

        import ray.train
        import torch

        if state.global_step != self.step or ray.train.get_context().get_world_rank() != self.rank:
            return
        if self.marker is not None:
            marker = pathlib.Path(self.marker)
            if marker.exists():
                return
            marker.write_text(f"rank {self.rank} ran out of memory at step {state.global_step}\n")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (raised by a test)")


class Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("restarts")
    saved = os.environ.get("RAYQUANT_CACHE")
    os.environ["RAYQUANT_CACHE"] = str(root / "cache")
    yield root
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAYQUANT_CACHE", None)
    else:
        os.environ["RAYQUANT_CACHE"] = saved


def _trainer(root, name: str, callback, sft=None, run=None):
    from rayquant.trainer import RayQuantTrainer

    return RayQuantTrainer(
        model="rayquant/tiny-llama", dataset=DATA, scaling={"num_workers": 2},
        sft={"seq_len": 128, "global_batch_size": 8, "max_steps": MAX_STEPS, "learning_rate": 5e-3,
             "logging_steps": 1, **(sft or {})},
        run={"name": name, "storage_path": str(root / "runs"), "checkpoint_every_steps": CHECKPOINT_EVERY,
             **(run or {})},
        callbacks=[callback])


@pytest.fixture(scope="module")
def oom_run(root):
    trainer = _trainer(root, "oom", OutOfMemoryOnce(OOM_AT_STEP, rank=1, marker=str(root / "oom-raised")))
    before = trainer.plan()
    out = io.StringIO()
    with contextlib.redirect_stdout(Tee(sys.stdout, out)):
        result = trainer.fit()
    return {"before": before, "result": result, "stdout": out.getvalue(), "marker": root / "oom-raised"}


# -- a real run: out of memory at step 3 on rank 1 -------------------------------------------------

@pytest.mark.ray
def test_the_planned_micro_batch_is_where_the_ladder_starts(oom_run):
    p = oom_run["before"].node_plans[0]
    assert (p.node_type, p.micro_batch_size, p.gradient_accumulation_steps) == ("CPU:2", 4, 1)
    assert oom_run["marker"].read_text().startswith(f"rank 1 ran out of memory at step {OOM_AT_STEP}")


@pytest.mark.ray
def test_out_of_memory_replans_a_smaller_micro_batch_and_finishes(oom_run):
    result = oom_run["result"]
    workers = result.manifest["workers"]
    # Every rank restarted with micro-batch 2 x accumulation 2: its share (4) and the global batch
    # (8) unchanged, resumed from the step-2 checkpoint and ran to the end.
    assert [(w["micro_batch_size"], w["gradient_accumulation_steps"]) for w in workers] == [(2, 2), (2, 2)]
    assert [w["steps"] for w in workers] == [MAX_STEPS, MAX_STEPS]
    assert [w["resumed_from_step"] for w in workers] == [CHECKPOINT_EVERY, CHECKPOINT_EVERY]
    assert len({w["adapter_sha256"] for w in workers}) == 1
    # The manifest's plan is the plan that finished; the result's too.
    plan = result.manifest["plan"]
    assert plan["global_batch_size"] == oom_run["before"].global_batch_size == 8
    assert [(p["micro_batch_size"], p["gradient_accumulation_steps"]) for p in plan["node_plans"]] == [(2, 2)]
    assert "out of memory at step 3" in plan["node_plans"][0]["reasons"]["micro_batch_size"]
    assert result.plan.node_plans[0].micro_batch_size == 2
    # The loss curve spans the restart: one point per step.
    assert result.manifest["loss"]["points"] == MAX_STEPS


@pytest.mark.ray
def test_the_restart_is_recorded_and_printed(oom_run):
    restarts = oom_run["result"].manifest["run"]["restarts"]
    assert len(restarts) == 1
    r = restarts[0]
    assert {k: r[k] for k in ("at_step", "cause", "node_type", "before", "after", "resumed_from_step", "rank")} == {
        "at_step": OOM_AT_STEP, "cause": "out_of_memory", "node_type": "CPU:2",
        "before": {"gradient_accumulation_steps": 1, "micro_batch_size": 4},
        "after": {"gradient_accumulation_steps": 2, "micro_batch_size": 2},
        "resumed_from_step": CHECKPOINT_EVERY, "rank": 1}
    assert r["memory_seen_bytes"] > 0  # the worker's peak RSS on CPU
    assert "calibration_file" not in r  # a CPU's memory is no GPU calibration
    lines = [x for x in oom_run["stdout"].splitlines() if "restart 1:" in x]
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("[rayquant] restart 1: out of memory (")
    assert line.endswith(f"on node type CPU:2 (rank 1) at step {OOM_AT_STEP}; micro-batch 4 -> 2, "
                         f"accumulation 1 -> 2; resuming from step {CHECKPOINT_EVERY}")


# -- a real run: out of memory with every setting pinned: nothing cheaper --------------------------

@pytest.mark.ray
def test_out_of_memory_with_nothing_cheaper_fails_with_the_figures(root):
    from rayquant.cli.errors import RUN_FAILED, kind_of, report
    from rayquant.config import yaml_spelling
    from rayquant.trainer import RunOutOfMemoryError

    pins = {"micro_batch_size": 4, "gradient_checkpointing": "unsloth", "optimizer": "adamw_8bit",
            "quantization": "nf4"}
    trainer = _trainer(root, "oom-pinned", OutOfMemoryOnce(1, rank=0), sft=pins)
    with pytest.raises(RunOutOfMemoryError) as e:
        trainer.fit()
    text = str(e.value)
    assert text.startswith("CPU:2 ran out of memory at step 1 with the cheapest setting rayquant can "
                           "re-plan to (micro_batch_size 4, gradient_checkpointing unsloth, optimizer "
                           "adamw_8bit, quantization nf4): ")
    assert " GiB in use of " in text and "the planner predicted a peak of " in text
    assert "To fix: lower seq_len from 128" in text
    assert ("unpin micro_batch_size (pinned to 4), gradient_checkpointing (pinned to unsloth), "
            "optimizer (pinned to adamw_8bit), quantization (pinned to nf4)") in text
    assert not (root / "runs" / "oom-pinned" / "adapter").exists()
    # `rayquant train` ends it as a failed run (exit 1), the settings spelled as YAML keys.
    assert kind_of(e.value) == "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert report(e.value, {"rayquant.spelling": yaml_spelling}, "rayquant train") == RUN_FAILED
    assert "Error: the run failed: RunOutOfMemoryError: CPU:2 ran out of memory" in err.getvalue()
    assert "unpin sft.micro_batch_size (pinned to 4)" in err.getvalue()


# -- a real run: out of memory with run.max_replans 0 -------------------------------------------------

@pytest.mark.ray
def test_out_of_memory_beyond_max_replans_fails_the_run(root):
    from rayquant.cli.errors import kind_of
    from rayquant.trainer import RunRestartsSpentError

    trainer = _trainer(root, "no-replans", OutOfMemoryOnce(1, rank=0, marker=str(root / "no-replans")),
                       run={"max_replans": 0})
    with pytest.raises(RunRestartsSpentError) as e:
        trainer.fit()
    text = str(e.value)
    assert text.startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "the run re-planned 0 time(s), as many as run.max_replans (0) allows. To fix: raise run.max_replans" in text
    assert kind_of(e.value) == "run"
    assert not (root / "runs" / "no-replans" / "adapter").exists()


# -- classification, without a run -------------------------------------------------------------------

def _plan():
    from planner.plan import JobSpec, MemoryBreakdown, NodePlan, TrainingPlan, WorkerAssignment

    a = NodePlan(node_type="CPU:2", gpu="CPU", nodes=1, gpus_per_node=2, quantization="nf4",
                 compute_dtype="bfloat16", micro_batch_size=4, gradient_accumulation_steps=1,
                 optimizer="adamw_torch", gradient_checkpointing="none", placement="per-gpu",
                 backend="unsloth", workers_per_node=2, gpus_per_worker=1, peak_memory_bytes=2**30,
                 memory_budget_bytes=4 * 2**30, breakdown=MemoryBreakdown(1, 1, 1, 1, 1, 1, 1),
                 tokens_per_second=500.0, reasons={})
    return TrainingPlan(model="rayquant/tiny-llama", model_summary={}, job=JobSpec(seq_len=128, global_batch_size=8),
                        node_plans=(a,), workers=(WorkerAssignment(0, "CPU:2", 0, 0),
                                                  WorkerAssignment(1, "CPU:2", 0, 1)))


def _oom(rank=1, step=3):
    from rayquant.contract import OutOfMemoryReport, WorkerOutOfMemory

    return WorkerOutOfMemory(OutOfMemoryReport(
        rank=rank, node_type="CPU:2", step=step, device="cuda:0", seen_bytes=70 * 2**30,
        seen_source="torch.cuda.max_memory_allocated", capacity_bytes=80 * 2**30, reserved_bytes=75 * 2**30,
        message="OutOfMemoryError: CUDA out of memory").to_json())


def test_worker_out_of_memory_travels_by_pickle_with_its_report():
    e = pickle.loads(pickle.dumps(_oom()))
    assert e.report.seen_bytes == 70 * 2**30 and e.report.step == 3
    assert str(e) == "rank 1 (CPU:2) ran out of memory at step 3: OutOfMemoryError: CUDA out of memory"


def test_torch_out_of_memory_is_recognised_through_a_chain():
    import torch

    from rayquant.worker.oom import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB"))
    try:
        try:
            raise torch.OutOfMemoryError("x")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("the optimizer step failed") from inner
    except RuntimeError as outer:
        assert is_out_of_memory(outer)
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shapes do not match"))
    assert not is_out_of_memory(MemoryError())  # host RAM: not the GPU allocator's error


def test_classify_names_the_cause_from_ray_trains_worker_errors():
    from ray.exceptions import ActorDiedError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback, WorkerHealthCheckFailedError

    from rayquant.restarts import classify

    plan = _plan()
    collateral = UserExceptionWithTraceback(RuntimeError("gloo: connection reset"), "tb")
    oom = WorkerGroupError("x", {0: collateral, 1: UserExceptionWithTraceback(_oom(), "tb")})
    fault = classify(oom, plan, {})
    assert (fault.cause, fault.rank, fault.node_type, fault.out_of_memory.step) == ("out_of_memory", 1, "CPU:2", 3)

    died = WorkerGroupError("x", {0: collateral, 1: WorkerHealthCheckFailedError("gone", ActorDiedError())})
    assert (classify(died, plan, {}).cause, classify(died, plan, {}).rank) == ("worker_died", 1)
    lost = classify(died, plan, {"CPU:2": 1})
    assert (lost.cause, lost.node_type, dict(lost.lost)) == ("node_lost", "CPU:2", {"CPU:2": 1})

    raised = WorkerGroupError("x", {1: UserExceptionWithTraceback(ValueError("bad row"), "ValueError: bad row")})
    assert classify(raised, plan, {}).cause == "worker_error"
    assert classify(RuntimeError("not Ray Train's"), plan, {}) is None


def test_restart_lines_say_cause_step_change_and_resume_point():
    from rayquant.restarts import Fault, Restart, restart_line

    r = Restart(at_step=12, cause="worker_died", node_type="A10G:1", before={}, after={},
                resumed_from_step=10, rank=3)
    fault = Fault("worker_died", 3, "A10G:1", "The actor died unexpectedly")
    assert restart_line(2, r, "no setting changed", fault) == (
        "[rayquant] restart 2: worker died on node type A10G:1 (rank 3) at step 12; same plan "
        "(The actor died unexpectedly); resuming from step 10")
    lost = Restart(at_step=5, cause="node_lost", node_type="CPU:1", before={"nodes": 2, "num_workers": 2},
                   after={"nodes": 1, "num_workers": 1}, resumed_from_step=0, rank=1)
    line = restart_line(1, lost, "workers 2 -> 1, nodes 2 -> 1", Fault("node_lost", 1, "CPU:1", "", lost={"CPU:1": 1}))
    assert line == ("[rayquant] restart 1: node lost (1 of CPU:1) on node type CPU:1 at step 5; workers 2 -> 1, "
                    "nodes 2 -> 1; starting over (no checkpoint yet)")


def test_a_gpu_out_of_memory_is_written_as_calibration_the_next_plan_reads(tmp_path):
    """The driver's calibration file from a GPU worker's out-of-memory report (no GPU needed: the
    report is the worker's figures): the planner reads it and plans for at least that much memory."""
    import planner
    from planner.calibration import Calibration
    from rayquant.contract import OutOfMemoryReport
    from rayquant.trainer import _write_oom_calibration

    spec = planner.load_model_spec("meta-llama/Llama-3.2-1B")
    job = planner.JobSpec(seq_len=2048, global_batch_size=16)
    plan = planner.make_plan(spec, planner.parse_gpu_spec("1x1xA10G"), job)
    p = plan.node_plans[0]
    est = planner.estimate_memory(spec, planner.lookup_gpu("A10G"), quantization=p.quantization, seq_len=2048,
                                  micro_batch_size=p.micro_batch_size, gradient_checkpointing=p.gradient_checkpointing,
                                  optimizer=p.optimizer, backend=p.backend)
    seen = int(est.allocated_bytes * 1.8)
    report = OutOfMemoryReport(rank=0, node_type=p.node_type, step=5, device="cuda:0", seen_bytes=seen,
                               seen_source="torch.cuda.max_memory_allocated", capacity_bytes=24 * 2**30,
                               reserved_bytes=seen + 2**28, message="OutOfMemoryError: CUDA out of memory")
    path = _write_oom_calibration(plan, report, spec, tmp_path)
    assert path == str(tmp_path / "calibration.json")
    cal = Calibration.load(path)
    assert cal.memory_factor("A10G", p.quantization) == pytest.approx(1.8, rel=1e-3)
    # A second out-of-memory error adds its measurement to the same file.
    _write_oom_calibration(plan, report, spec, tmp_path)
    assert len(Calibration.load(path).measurements) == 2
    # The next plan, made with it, does not plan that setting again: 1.8x its memory does not fit.
    again = planner.make_plan(spec, planner.parse_gpu_spec("1x1xA10G"), job, calibration=cal)
    q = again.node_plans[0]
    assert (q.micro_batch_size, q.gradient_checkpointing, q.optimizer, q.quantization) != (
        p.micro_batch_size, p.gradient_checkpointing, p.optimizer, p.quantization)
    assert q.samples_per_step == p.samples_per_step == 16
    # A CPU worker's peak RSS is no GPU calibration.
    cpu = OutOfMemoryReport(**{**report.__dict__, "device": "cpu"})
    assert _write_oom_calibration(plan, cpu, spec, tmp_path / "cpu") is None
