"""End to end on CPU with the real stack: RayQuantTrainer -> local Ray -> 2 Ray Train workers (DDP
over gloo) -> Unsloth CPU fallback in 4-bit -> TRL SFTTrainer -> one gathered adapter.

Two training runs are shared by the module. Their plan is heterogeneous on purpose (rank 0:
micro-batch 2 x accumulation 2, rank 1: 1 x 3). In the first, rank 1's process kills itself with
SIGKILL after step 3 (a user callback, KillOnce, once: a marker file), so the run proves
`callbacks=` reaching the workers and Ray Train restarting the worker group from the step-2
checkpoint. The second is the same run uninterrupted: the resumed run's adapter must equal it
bitwise (CPU training here is deterministic: no dropout, data read in order, every rank's RNG state
restored), and every rank must train the same rows at every step (a forward hook logs them), none
twice and none skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

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


def _fit(root, name, callbacks, **run):
    from rayquant.trainer import RayQuantTrainer

    trainer = RayQuantTrainer(
        model="rayquant/tiny-llama", dataset=str(root / "data.jsonl"), plan=hetero_plan(),
        sft={"max_steps": MAX_STEPS, "learning_rate": 5e-3, "logging_steps": 1},
        run={"name": name, "storage_path": str(root / "runs"), "checkpoint_every_steps": CHECKPOINT_EVERY,
             "max_failures": 1, **run},
        callbacks=callbacks)
    return trainer, trainer.fit()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(killed and resumed run, the same run uninterrupted, row ids by their tokens, root)."""
    import ray

    from train_callbacks import KillOnce, RowLog, Threads, unique_alpaca

    root = tmp_path_factory.mktemp("e2e")
    unique_alpaca(DATA, root / "data.jsonl")
    saved = os.environ.get("RAYQUANT_CACHE")
    os.environ["RAYQUANT_CACHE"] = str(root / "cache")
    try:
        trainer, killed = _fit(root, "e2e", [KillOnce(FAIL_AT_STEP, rank=1, marker=str(root / "killed"),
                                                      run_dir=str(root / "runs" / "e2e"),
                                                      checkpoint_step=FAIL_AT_STEP // CHECKPOINT_EVERY * CHECKPOINT_EVERY),
                                             RowLog(str(root / "rows-killed"))])
        # The same name again: the first run finished, so this one starts beside it.
        _, reference = _fit(root, "e2e", [RowLog(str(root / "rows-reference")), Threads(str(root / "threads"))],
                            output_dir=str(root / "elsewhere"))
        rows = trainer.check().tokens.dataset["input_ids"]
    finally:
        if saved is None:
            os.environ.pop("RAYQUANT_CACHE", None)
        else:
            os.environ["RAYQUANT_CACHE"] = saved
    yield killed, reference, {tuple(r): i for i, r in enumerate(rows)}, root
    ray.shutdown()


@pytest.fixture(scope="module")
def run(runs):
    return runs[0]


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
def test_killed_worker_restarted_and_resumed_from_checkpoint(runs):
    run, _, _, root = runs
    killed = json.loads((root / "killed").read_text())
    assert (killed["rank"], killed["step"]) == (1, FAIL_AT_STEP)
    last_checkpoint = (FAIL_AT_STEP // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
    assert [w["resumed_from_step"] for w in run.manifest["workers"]] == [last_checkpoint] * 2
    assert run.manifest["run"]["steps"] == MAX_STEPS
    # Restarted with the same plan (run.max_failures), and the manifest says so.
    [restart] = run.manifest["run"]["restarts"]
    assert {k: restart[k] for k in ("cause", "rank", "before", "after", "resumed_from_step")} == {
        "cause": "worker_died", "rank": 1, "before": {}, "after": {}, "resumed_from_step": last_checkpoint}
    # Ray merged the ranks' checkpoint directories: every rank's RNG state is there to resume from.
    states = list(run.run_dir.glob("checkpoint_*/checkpoint/rayquant_state.json"))
    assert states and all({"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(p.parent)) for p in states)
    steps = [s for s, _ in run.manifest["loss"]["curve"]]
    assert steps == list(range(1, MAX_STEPS + 1))  # the curve survives the restart


@pytest.mark.ray
def test_resumed_adapter_equals_the_uninterrupted_run_bitwise(runs):
    from train_callbacks import assert_same_training

    killed, reference, _, _ = runs
    assert [w["resumed_from_step"] for w in reference.manifest["workers"]] == [None, None]
    assert_same_training(killed, reference)


@pytest.mark.ray
def test_resumed_ranks_train_each_row_once_as_the_uninterrupted_run(runs):
    from rayquant.data import shard_indices
    from train_callbacks import trajectory

    _, _, row_ids, root = runs
    per_rank = [4, 3]
    last_checkpoint = (FAIL_AT_STEP // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
    for rank in (0, 1):
        resumed, starts = trajectory(root / "rows-killed", rank, row_ids)
        uninterrupted, ref_starts = trajectory(root / "rows-reference", rank, row_ids)
        assert starts == [1, last_checkpoint + 1] and ref_starts == [1]
        assert resumed == uninterrupted  # step by step, micro-batch by micro-batch
        trained = [i for s in sorted(resumed) for batch in resumed[s] for i in batch]
        assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
        # each row of the rank's first MAX_STEPS global-batch slices once, in order
        assert trained == shard_indices(len(row_ids), per_rank, rank)[:MAX_STEPS * per_rank[rank]]


@pytest.mark.ray
def test_each_worker_trains_with_the_threads_ray_gave_it(runs):
    # Ray sets OMP_NUM_THREADS (1 CPU per worker here) after the process-setup hook imported torch
    # with every core; the worker applies it, else two workers on two cores oversubscribe them.
    root = runs[3]
    for rank in (0, 1):
        threads = json.loads((root / "threads" / f"threads-rank{rank}.json").read_text())
        assert threads == {"torch": 1, "omp": "1"}


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
def test_rerunning_a_finished_run_starts_a_new_one_beside_it(runs):
    # Ray Train would restore the finished run's final checkpoint (adapters only); the trainer must
    # start a fresh run instead (the uninterrupted run above has the same name), whether or not
    # the adapter goes elsewhere.
    killed, again, _, root = runs
    assert (killed.run_dir / "rayquant_finished.json").exists()
    assert again.run_dir.parent == killed.run_dir.parent and again.run_dir.name.startswith("e2e-")
    assert [w["steps"] for w in again.manifest["workers"]] == [MAX_STEPS, MAX_STEPS]
    assert again.adapter_dir == root / "elsewhere" and (again.adapter_dir / "adapter_config.json").exists()


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

