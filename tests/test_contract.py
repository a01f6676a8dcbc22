"""The driver-worker contract (rayquant.contract): strict JSON round trips of what the driver sends
(WorkerConfig) and what each worker sends back (WorkerStats), and the worker's own checkpoint state.

The samples below are literal JSON as this version writes it, not built from the classes: renaming
a field on either side breaks a test here instead of a run."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from planner.plan import JobSpec, MemoryBreakdown, NodePlan, TrainingPlan, WorkerAssignment
from rayquant.contract import (ContractError, DeviceInfo, QuantizationReport, SftSettings, WorkerConfig,
                               WorkerStats)


def _plan() -> TrainingPlan:
    job = JobSpec(seq_len=128, global_batch_size=3, lora_rank=8, quantization="nf4", optimizer="adamw_8bit")
    node = NodePlan(node_type="CPU:1", gpu="CPU", nodes=1, gpus_per_node=3, quantization="nf4",
                    compute_dtype="bfloat16", micro_batch_size=1, gradient_accumulation_steps=1,
                    optimizer="adamw_8bit", gradient_checkpointing="unsloth", placement="per-gpu",
                    backend="unsloth", workers_per_node=3, gpus_per_worker=1, peak_memory_bytes=2**30,
                    memory_budget_bytes=2**32, breakdown=MemoryBreakdown(1, 2, 3, 4, 5, 6, 7),
                    tokens_per_second=500.0, reasons={"quantization": "pinned"})
    return TrainingPlan(model="rayquant/tiny-llama", model_summary={"name": "tiny-llama"}, job=job,
                        node_plans=(node,), workers=tuple(WorkerAssignment(r, "CPU:1", 0, r) for r in range(3)))


SFT = {"max_steps": 8, "seq_len": 128, "dataset_format": "messages", "learning_rate": 0.005,
       "lr_scheduler": "linear", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
       "logging_steps": 1, "seed": 0, "checkpoint_every_steps": 2, "packing": True, "evaluate": True,
       "eval_steps": 4, "keep_best": True, "report_to": ["tensorboard", "mlflow"], "run_name": "run-1"}


def _config_json() -> dict:
    return {"plan": _plan().to_dict(), "model": "rayquant/tiny-llama", "sft": dict(SFT),
            "label_selectors": [{"ray.io/node-id": "a"}, {"ray.io/node-id": "b"}, {"ray.io/node-id": "b"}],
            "run_config": {"model": "rayquant/tiny-llama", "sft": {"seq_len": 128}}}


STATS = {
    "rank": 1, "node_type": "A10G:1", "hostname": "worker-1", "node_id": "ab12",
    "device": {"device": "cuda:0", "name": "NVIDIA A10G", "memory_bytes": 23836033024},
    "placement": "per-gpu", "engine": "DistributedDataParallel",
    "quantization": {"planned": "dynamic-4bit", "used": "dynamic-4bit",
                     "details": {"linear4bit_modules": 11, "protected_modules": ["model.layers.0.mlp.down_proj"],
                                 "protected_cost_bytes": 1024, "protected_budget_bytes": 4096,
                                 "protected_reasons": {"model.layers.0.mlp.down_proj": "largest NF4 error"}},
                     "modules_after_training": {"linear4bit": 11, "fp8_rowwise": 0}},
    "optimizer_planned": "adamw_8bit", "optimizer_used": "bitsandbytes.optim.AdamW8bit",
    "micro_batch_size": 1, "gradient_accumulation_steps": 3, "shard_rows": 81, "global_steps": 8,
    "resumed_from_step": 2, "trainable_parameters": 28672, "adapter_dtype": "float32",
    "peak_memory_bytes": 1234567, "peak_memory_source": "torch.cuda.max_memory_allocated",
    "predicted_peak_memory_bytes": 2345678, "train_s": 12.5, "tokens_per_s": 810.25,
    "predicted_tokens_per_s": 400.0, "losses": [[1, 5.5], [2, 5.25]], "adapter_sha256": "0" * 64,
    "eval_losses": [[4, 5.4], [8, 5.1]], "eval_tokens": 640, "adapter_step": 8, "stopped": None,
}


# -- round trips ------------------------------------------------------------------------------------

def test_worker_config_round_trips_through_json():
    raw = _config_json()
    config = WorkerConfig.from_dict(raw)
    assert config.plan == _plan() and config.sft == SftSettings(**dict(SFT, report_to=("tensorboard", "mlflow")))
    assert config.label_selectors[2] == {"ray.io/node-id": "b"}
    assert json.loads(config.to_json()) == json.loads(json.dumps(raw))
    assert WorkerConfig.from_json(config.to_json()) == config
    local = dataclasses.replace(config, label_selectors=None)  # the local machine: nothing to pin
    assert WorkerConfig.from_json(local.to_json()) == local


def test_worker_stats_round_trip_through_json():
    stats = WorkerStats.from_json(json.dumps(STATS))
    assert stats.device == DeviceInfo("cuda:0", "NVIDIA A10G", memory_bytes=23836033024)
    assert stats.losses == ((1, 5.5), (2, 5.25)) and stats.resumed_from_step == 2
    assert json.loads(stats.to_json()) == STATS
    assert WorkerStats.from_json(stats.to_json()) == stats
    fresh = dataclasses.replace(stats, resumed_from_step=None, losses=())
    assert WorkerStats.from_json(fresh.to_json()) == fresh


def test_sft_settings_take_the_trainer_settings_of_the_options():
    from rayquant.config import SftOptions

    sft = SftOptions(learning_rate=0.005, logging_steps=1, seq_len=512, packing=True, eval_steps=4,
                     keep_best=True)
    got = SftSettings.from_options(sft, max_steps=8, seq_len=128, dataset_format="messages",
                                   checkpoint_every_steps=2, evaluate=True,
                                   report_to=("tensorboard", "mlflow"), run_name="run-1")
    # seq_len is the plan's, not the options' default; report_to is what can run (the driver's)
    assert got == SftSettings(**dict(SFT, report_to=("tensorboard", "mlflow")))
    # without eval rows, eval settings do not travel (the config refuses them before this)
    quiet = SftSettings.from_options(sft, max_steps=8, seq_len=128, dataset_format="messages")
    assert (quiet.evaluate, quiet.eval_steps, quiet.keep_best) == (False, None, False)


def test_manifest_forms_of_device_and_quantization():
    assert DeviceInfo("cpu", "CPU", cpus=4).to_dict() == {"device": "cpu", "name": "CPU", "cpus": 4}
    q = QuantizationReport.from_dict(STATS["quantization"]).to_manifest()
    assert list(q)[:3] == ["planned", "used", "linear4bit_modules"] and list(q)[-1] == "modules_after_training"
    assert q["protected_reasons"] == STATS["quantization"]["details"]["protected_reasons"]


def test_the_loaders_info_becomes_the_quantization_report():
    from rayquant.loading import quantization_report

    info = {"backend": "unsloth", "quantization_planned": "dynamic-4bit", "quantization_used": "dynamic-4bit",
            "compute_dtype": "bfloat16", "linear4bit_modules": 11, "trainable_parameters": 28672,
            "protected_modules": ["model.layers.0.mlp.down_proj"], "protected_cost_bytes": 1024,
            "protected_budget_bytes": 4096, "reasons": {"model.layers.0.mlp.down_proj": "largest NF4 error"}}
    got = quantization_report(info, {"linear4bit": 11, "fp8_rowwise": 0})
    assert got == QuantizationReport.from_dict(STATS["quantization"])


# -- a field renamed, dropped or added fails loudly -------------------------------------------------

@pytest.mark.parametrize("edit, words", [
    (lambda d: d.pop("shard_rows"), ["WorkerStats of rank 1", "missing field(s) shard_rows"]),
    (lambda d: d.update(extra=1), ["unknown field(s) extra"]),
    (lambda d: d.update(rows=d.pop("shard_rows")), ["missing field(s) shard_rows", "unknown field(s) rows"]),
    (lambda d: d["device"].update(gpu="A10G"), ["DeviceInfo", "unknown field(s) gpu"]),
    (lambda d: d["quantization"].pop("used"), ["QuantizationReport", "missing field(s) used"]),
    (lambda d: d.update(rank="1"), ["rank must be <class 'int'>, got '1'"]),
    (lambda d: d.update(losses=[[1, "5.5"]]), ["losses must be"]),
    (lambda d: d.update(global_steps=8.0), ["global_steps must be"]),
])
def test_worker_stats_that_do_not_match_are_refused(edit, words):
    raw = json.loads(json.dumps(STATS))
    edit(raw)
    with pytest.raises(ContractError) as err:
        WorkerStats.from_json(json.dumps(raw))
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.pop("model"), ["WorkerConfig", "missing field(s) model", "same rayquant version"]),
    (lambda d: d.update(data_ref=None), ["unknown field(s) data_ref"]),
    (lambda d: d["sft"].update(total_steps=d["sft"].pop("max_steps")),
     ["SftSettings", "missing field(s) max_steps", "unknown field(s) total_steps"]),
    (lambda d: d["sft"].update(seq_len=64), ["sft.seq_len 64 is not the plan's seq_len 128"]),
    (lambda d: d["sft"].update(dataset_format="auto"), ["dataset_format must be a detected format"]),
    (lambda d: d["sft"].update(learning_rate="high"), ["learning_rate must be"]),
    (lambda d: d.update(label_selectors=[{}]), ["1 label selectors for 3 workers"]),
    (lambda d: d["plan"].pop("workers"), ["WorkerConfig.plan is not a rayquant plan"]),
])
def test_worker_configs_that_do_not_match_are_refused(edit, words):
    raw = _config_json()
    edit(raw)
    with pytest.raises(ContractError) as err:
        WorkerConfig.from_json(json.dumps(raw))
    for w in words:
        assert w in str(err.value)


def test_missing_and_unknown_fields_are_named_together():
    raw = dict(STATS)
    del raw["hostname"], raw["node_id"]
    raw["host"] = "x"
    with pytest.raises(ContractError, match=r"missing field\(s\) hostname, node_id; unknown field\(s\) host"):
        WorkerStats.from_dict(raw)
    with pytest.raises(ContractError, match="must be a JSON object, got list"):
        WorkerConfig.from_json("[]")


def test_both_sides_import_the_contract_without_torch_or_ray():
    code = ("import sys, rayquant.contract, rayquant.worker, rayquant.worker.checkpoint\n"
            "print(' '.join(m for m in ('torch', 'ray', 'transformers', 'unsloth') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# -- within the workers: the checkpoint state a restarted run reads --------------------------------

def test_checkpoint_state_round_trips_and_refuses_another_shape():
    from rayquant.worker.checkpoint import CheckpointState

    state = CheckpointState(global_step=2, data_position_rows=14, world_size=2, losses=[[1, 5.5], [2, 5.25]])
    assert CheckpointState.from_json(state.to_json(), "here") == state and state.losses[1] == (2, 5.25)
    raw = json.loads(state.to_json())
    raw["workers"] = raw.pop("world_size")
    with pytest.raises(RuntimeError, match="checkpoint state here does not match this rayquant.*workers"):
        CheckpointState.from_json(json.dumps(raw), "here")
