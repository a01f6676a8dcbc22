"""End to end on CPU with the real stack: RayQuantTrainer -> local Ray -> 2 Ray Train workers (DDP
over gloo) -> Unsloth CPU fallback in 4-bit -> TRL SFTTrainer -> one gathered adapter.

One training run is shared by the module. Its plan is heterogeneous on purpose (rank 0: micro-batch
2 x accumulation 2, rank 1: 1 x 3), and rank 1 fails once at step 3 (a user callback, FailOnce), so
the run also proves `callbacks=` reaching the workers and restart + resume from the step-2 checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from transformers import TrainerCallback

from planner.plan import JobSpec, MemoryBreakdown, NodePlan, TrainingPlan, WorkerAssignment

MAX_STEPS = 8
FAIL_AT_STEP = 3
CHECKPOINT_EVERY = 2
DATA = "examples/data/tiny_alpaca.jsonl"


def hetero_plan() -> TrainingPlan:
    job = JobSpec(seq_len=128, global_batch_size=7, lora_rank=8, lora_alpha=16, quantization="nf4",
                  optimizer="adamw_8bit")
    a = NodePlan(node_type="CPU:a", gpu="CPU", nodes=1, gpus_per_node=1, quantization="nf4",
                 compute_dtype="bfloat16", micro_batch_size=2, gradient_accumulation_steps=2,
                 optimizer="adamw_8bit", gradient_checkpointing="unsloth", placement="per-gpu",
                 backend="unsloth", workers_per_node=1, gpus_per_worker=1, peak_memory_bytes=2**30,
                 memory_budget_bytes=4 * 2**30, breakdown=MemoryBreakdown(1, 1, 1, 1, 1, 1, 1),
                 tokens_per_second=500.0, reasons={"test": "hand-built heterogeneous plan"})
    b = dataclasses.replace(a, node_type="CPU:b", micro_batch_size=1, gradient_accumulation_steps=3,
                            tokens_per_second=400.0)
    return TrainingPlan(model="rayquant/tiny-llama", model_summary={"name": "tiny-llama"}, job=job,
                        node_plans=(a, b), workers=(WorkerAssignment(0, "CPU:a", 0, 0),
                                                    WorkerAssignment(1, "CPU:b", 0, 0)))


class FailOnce(TrainerCallback):
    """Raise on `rank` at the end of `step`, once: the marker file says it happened."""

    def __init__(self, step: int, rank: int, marker: str) -> None:
        self.step, self.rank, self.marker = step, rank, marker

    def on_step_end(self, args, state, control, **kwargs):
        import pathlib

        import ray.train

        marker = pathlib.Path(self.marker)
        if (state.global_step == self.step and ray.train.get_context().get_world_rank() == self.rank
                and not marker.exists()):
            marker.write_text(f"rank {self.rank} failed at step {state.global_step}\n")
            raise RuntimeError(f"FailOnce at step {state.global_step} on rank {self.rank}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import ray

    from rayquant.trainer import RayQuantTrainer

    root = tmp_path_factory.mktemp("e2e")
    saved = {k: os.environ.get(k) for k in ("RAYQUANT_CACHE",)}
    os.environ.update(RAYQUANT_CACHE=str(root / "cache"))
    try:
        trainer = RayQuantTrainer(
            model="rayquant/tiny-llama", dataset=DATA, plan=hetero_plan(),
            sft={"max_steps": MAX_STEPS, "learning_rate": 5e-3, "logging_steps": 1},
            run={"name": "e2e", "storage_path": str(root / "runs"), "checkpoint_every_steps": CHECKPOINT_EVERY,
                 "max_failures": 1},
            callbacks=[FailOnce(FAIL_AT_STEP, rank=1, marker=str(root / "fault-injected"))])
        result = trainer.fit()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield result
    ray.shutdown()



@pytest.mark.ray
def test_each_rank_ran_every_step_with_its_own_settings(run):
    workers = run.manifest["workers"]
    assert [w["node_type"] for w in workers] == ["CPU:a", "CPU:b"]
    assert [(w["micro_batch_size"], w["gradient_accumulation_steps"]) for w in workers] == [(2, 2), (1, 3)]
    assert [w["steps"] for w in workers] == [MAX_STEPS, MAX_STEPS]
    # 192 rows in global batches of 7: 27 steps per epoch; shards in proportion 4 : 3.
    assert [w["shard_rows"] for w in workers] == [27 * 4, 27 * 3]
    assert all(w["quantization"]["used"] == "nf4" for w in workers)
    assert all(w["optimizer"]["used"] == "bitsandbytes.optim.AdamW8bit" for w in workers)


@pytest.mark.ray
def test_failed_worker_restarted_and_resumed_from_checkpoint(run):
    marker = run.run_dir.parent.parent / "fault-injected"
    assert marker.read_text().startswith(f"rank 1 failed at step {FAIL_AT_STEP}")
    last_checkpoint = (FAIL_AT_STEP // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
    assert [w["resumed_from_step"] for w in run.manifest["workers"]] == [last_checkpoint] * 2
    assert run.manifest["run"]["steps"] == MAX_STEPS
    steps = [s for s, _ in run.manifest["loss"]["curve"]]
    assert steps == list(range(1, MAX_STEPS + 1))  # the curve survives the restart


@pytest.mark.ray
def test_loss_goes_down(run):
    loss = run.manifest["loss"]
    assert loss["points"] == MAX_STEPS
    assert loss["last_fifth_mean"] < loss["first_fifth_mean"] - 0.05, loss


@pytest.mark.ray
def test_rank_adapters_identical_and_hash_recorded(run):
    from rayquant.adapters import adapter_sha256

    hashes = {w["adapter_sha256"] for w in run.manifest["workers"]}
    assert hashes == {run.manifest["adapter_sha256"]} == {adapter_sha256(run.adapter_dir)}


@pytest.mark.ray
def test_adapter_loads_with_peft_and_changes_outputs(run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = os.path.join(os.path.dirname(str(run.run_dir)), "..", "cache", "models", "tiny-llama")
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok("### Instruction:\nwhich one is the cat\n\n### Input:\ncat dog\n\n### Response:\n",
              return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(run.adapter_dir))
    with torch.no_grad():
        after = tuned(ids).logits
    assert (after - before).abs().max().item() > 1e-3


@pytest.mark.ray
def test_manifest_measures_next_to_predictions(run):
    manifest = json.loads((run.adapter_dir / "manifest.json").read_text())
    assert manifest["plan"]["node_plans"][0]["node_type"] == "CPU:a"
    for w in manifest["workers"]:
        assert w["peak_memory_bytes"]["measured"] > 50 * 2**20
        assert w["peak_memory_bytes"]["source"].startswith("peak RSS")
        assert w["peak_memory_bytes"]["predicted"] == 2**30
        assert w["tokens_per_s"]["measured"] > 0
        assert w["tokens_per_s"]["predicted"] in (500.0, 400.0)
    assert manifest["versions"]["unsloth"] != "not installed"
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= set(os.listdir(run.adapter_dir))


@pytest.mark.ray
def test_rerunning_a_finished_run_starts_a_new_one_beside_it(run):
    # Ray Train would restore the finished run's final checkpoint (adapters only); the trainer must
    # start a fresh run instead, and say where, whether or not the adapter goes elsewhere.
    from rayquant.trainer import RayQuantTrainer

    assert (run.run_dir / "rayquant_finished.json").exists()
    out = run.run_dir.parent / "elsewhere"
    again = RayQuantTrainer(
        model="rayquant/tiny-llama", dataset=DATA, plan=hetero_plan(),
        sft={"max_steps": 2, "learning_rate": 5e-3, "logging_steps": 1},
        run={"name": "e2e", "storage_path": str(run.run_dir.parent), "output_dir": str(out)}).fit()
    assert again.run_dir != run.run_dir and again.run_dir.name.startswith("e2e-")
    assert [w["steps"] for w in again.manifest["workers"]] == [2, 2]
    assert (out / "adapter_config.json").exists()


@pytest.mark.ray
def test_ray_data_input_is_checked_on_the_driver(run):
    import ray.data

    from rayquant.data import DatasetError, prepare

    good = prepare(ray.data.from_items([{"text": "a b"}, {"text": "c d"}]))
    assert good.num_rows == 2 and good.format == "text"
    with pytest.raises(DatasetError, match="row 2: field 'text'"):  # rows counted from 1
        prepare(ray.data.from_items([{"text": "a"}, {"text": ""}]))


def test_plan_loads_no_weights(tmp_path):
    """.plan() on a tiny id in an empty cache: no torch import, no model written."""
    code = (
        "import sys\n"
        "from rayquant.trainer import RayQuantTrainer\n"
        f"t = RayQuantTrainer(model='rayquant/tiny-llama', dataset={DATA!r}, scaling={{'num_workers': 2}},"
        " sft={'seq_len': 128, 'global_batch_size': 8})\n"
        "p = t.plan()\n"
        "assert p.num_workers == 2 and p.global_batch_size == 8, p\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "print('planned', p.node_plans[0].quantization)\n")
    env = dict(os.environ, RAYQUANT_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "planned" in out.stdout
    assert not (tmp_path / "cache" / "models").exists()


def test_plan_with_mixed_optimizers_is_refused_before_ray(tmp_path):
    from rayquant.config import ConfigError
    from rayquant.trainer import RayQuantTrainer

    plan = hetero_plan()
    b = dataclasses.replace(plan.node_plans[1], optimizer="adamw_torch")
    plan = dataclasses.replace(plan, node_plans=(plan.node_plans[0], b))
    trainer = RayQuantTrainer(model="rayquant/tiny-llama", dataset=DATA, plan=plan,
                              run={"storage_path": str(tmp_path)})
    with pytest.raises(ConfigError, match="different optimizers"):
        trainer.fit()


def test_progress_line():
    from rayquant.progress import format_progress

    line = format_progress(5, 20, 1.23456, 1234.4, 10.0)
    assert line == "[rayquant] step 5/20 (25%)  loss 1.2346  tokens/s 1,234  ETA 0:00:30"


def _gpu_node_plan(node_type: str, gpu: str, gpus_per_worker: int) -> NodePlan:
    return dataclasses.replace(
        hetero_plan().node_plans[0], node_type=node_type, gpu=gpu, gpus_per_node=gpus_per_worker,
        gpus_per_worker=gpus_per_worker, placement="node-spanning" if gpus_per_worker > 1 else "per-gpu")


def test_mixing_node_spanning_and_per_gpu_workers_is_refused_before_ray(tmp_path):
    from planner.plan import PlanError
    from rayquant.trainer import RayQuantTrainer

    plan = dataclasses.replace(
        hetero_plan(), node_plans=(_gpu_node_plan("A10G:4", "A10G", 4), _gpu_node_plan("H100-80GB:1", "H100-80GB", 1)),
        workers=(WorkerAssignment(0, "A10G:4", 0, 0), WorkerAssignment(1, "H100-80GB:1", 0, 0)))
    trainer = RayQuantTrainer(model="rayquant/tiny-llama", dataset=DATA, plan=plan,
                              run={"storage_path": str(tmp_path / "runs")})
    with pytest.raises(PlanError) as err:
        trainer.fit()
    msg = str(err.value)
    assert "A10G:4: 4, H100-80GB:1: 1" in msg and "node-spanning and per-GPU" in msg
    assert "To fix:" in msg and "--quantization nf4" in msg
    assert not (tmp_path / "runs").exists()  # refused before Ray Train made the run's storage


def test_a_zero3_plan_mixed_with_ddp_is_refused_before_ray(tmp_path):
    from planner.plan import PlanError
    from rayquant.trainer import RayQuantTrainer

    plan = hetero_plan()
    zero = dataclasses.replace(plan.node_plans[0], placement="zero3", backend="hf")
    plan = dataclasses.replace(plan, node_plans=(zero, dataclasses.replace(plan.node_plans[1], backend="hf")))
    trainer = RayQuantTrainer(model="rayquant/tiny-llama", dataset=DATA, plan=plan,
                              run={"storage_path": str(tmp_path / "runs")})
    with pytest.raises(PlanError, match="every node type of the plan must use placement zero3") as err:
        trainer.fit()
    assert "To fix: re-plan with `rayquant plan --backend hf`" in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_chat_data_under_a_tokenizer_without_a_usable_template_fails_before_ray(tmp_path, tiny_llama_dir):
    import shutil

    from rayquant.data import DatasetError
    from rayquant.trainer import RayQuantTrainer

    model = tmp_path / "no-template"
    shutil.copytree(tiny_llama_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    trainer = RayQuantTrainer(model=str(model), dataset="examples/data/tiny_chat.jsonl",
                              sft={"max_steps": 1, "seq_len": 64, "global_batch_size": 2},
                              scaling={"num_workers": 2}, run={"storage_path": str(tmp_path / "runs")})
    with pytest.raises(DatasetError, match="chat data for"):
        trainer.fit()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

