"""The fine-tuning features end to end on CPU with the real stack, in one Ray run shared by the
module: a Hub model (not in the catalog) read from a local Hub cache by every worker, evaluation
rows held out (sft.eval_fraction) and scored every sft.eval_steps over both ranks, packed rows,
the best adapter kept, TensorBoard and MLflow (its local file store) fed by rank 0; then the
adapter merged into its base (`rayquant export --merged`)."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_hub_repo

MODEL = "fake-org/tiny-llama"
MAX_STEPS, EVAL_STEPS = 4, 2
DATA = "examples/data/tiny_alpaca.jsonl"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir):
    import ray

    from rayquant.trainer import RayQuantTrainer

    root = tmp_path_factory.mktemp("features")
    write_hub_repo(root / "hub", MODEL, {p.name: p for p in Path(tiny_llama_dir).iterdir() if p.is_file()})
    saved = {k: os.environ.get(k) for k in ("HF_HUB_CACHE", "RAYQUANT_CACHE", "WANDB_MODE")}
    # W&B offline, as a user without an account (or a cluster without the internet) runs it.
    os.environ.update(HF_HUB_CACHE=str(root / "hub"), RAYQUANT_CACHE=str(root / "cache"), WANDB_MODE="offline")
    try:
        trainer = RayQuantTrainer(
            model=MODEL, dataset=DATA, scaling={"num_workers": 2},
            sft={"seq_len": 128, "global_batch_size": 8, "max_steps": MAX_STEPS, "learning_rate": 2e-2,
                 "logging_steps": 1, "quantization": "nf4", "optimizer": "adamw_8bit", "packing": True,
                 "eval_fraction": 0.1, "eval_steps": EVAL_STEPS, "keep_best": True},
            run={"name": "features", "storage_path": str(root / "runs"),
                 "report_to": ["tensorboard", "mlflow", "wandb"]})
        result = trainer.fit()
        yield result, root
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        ray.shutdown()


@pytest.mark.ray
def test_the_hub_model_trained_on_packed_rows_on_both_ranks(run):
    result, _ = run
    m = result.manifest
    assert m["plan"]["model"] == MODEL
    assert [w["steps"] for w in m["workers"]] == [MAX_STEPS, MAX_STEPS]
    train = m["data"]["train"]
    # 192 rows, 10% held out for evaluation; the rest packed into fewer, longer rows
    assert train["rows"] == 192 - m["data"]["eval"]["rows"] and m["data"]["eval"]["rows"] == 19
    assert train["packed"] and train["packed_rows"] < train["kept_rows"] == train["rows"]
    assert [r["rank"] for r in m["data"]["per_rank"]] == [0, 1]
    assert all(r["source_rows"] > r["rows"] and r["trainable_tokens"] > 0 for r in m["data"]["per_rank"])
    assert m["loss"]["points"] == MAX_STEPS and all(math.isfinite(v) for _, v in m["loss"]["curve"])


@pytest.mark.ray
def test_eval_loss_every_eval_steps_over_every_eval_token(run):
    result, _ = run
    ev = result.manifest["eval"]
    assert [s for s, _ in ev["curve"]] == list(range(EVAL_STEPS, MAX_STEPS + 1, EVAL_STEPS))
    assert all(math.isfinite(v) for _, v in ev["curve"]) and ev["last"] == ev["curve"][-1][1]
    # one all-reduce of [loss sum, tokens]: the tokens of both ranks' slices, each counted once
    assert ev["tokens"] == result.manifest["data"]["eval"]["trainable_tokens"]
    best = min(ev["curve"], key=lambda x: x[1])
    assert ev["best"] == {"step": best[0], "loss": best[1]} and ev["adapter_step"] == best[0]


def _tfrecord_events(path: Path):
    """The Event protos of a TensorBoard event file (TFRecord: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        payload = data[at + 12:at + 12 + length]
        at += 12 + length + 4
        event = event_pb2.Event()
        event.ParseFromString(payload)
        events.append(event)
    return events


@pytest.mark.ray
def test_rank_0_reported_to_tensorboard_and_mlflow_with_the_plan(run):
    result, root = run
    files = list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file under the run directory"
    tags = {v.tag for f in files for e in _tfrecord_events(f) for v in e.summary.value}
    assert {"train/loss", "eval/loss", "eval/tokens"} <= tags
    assert any(t.startswith("rayquant/plan") for t in tags)

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=(result.run_dir / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "rayquant"]
    (mlrun,) = client.search_runs([experiment.experiment_id])  # one run: rank 0's
    assert mlrun.info.run_name == "features"
    params = mlrun.data.params
    assert params["plan.job.seq_len"] == "128" and params["rayquant.sft.packing"] == "True"
    assert params["plan.model"] == MODEL
    assert {"loss", "eval_loss"} <= set(mlrun.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id, "rayquant")}
    assert {"rayquant/plan.json", "rayquant/config.json"} <= artifacts
    assert result.manifest["run"]["report_to"] == ["tensorboard", "mlflow", "wandb"]


@pytest.mark.ray
def test_rank_0_reported_to_wandb_offline_with_the_plan(run):
    result, _ = run
    # One offline run (rank 0's) under the run directory, named after the run, holding the plan as
    # its config and the losses: its transaction log keeps them as protobuf records.
    (offline,) = (result.run_dir / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    data = log.read_bytes()
    assert b"features" in data and b"train/loss" in data and b"eval/loss" in data
    assert b"plan" in data and b"node_plans" in data and MODEL.encode() in data


@pytest.mark.ray
def test_the_adapter_merges_into_a_16bit_model_that_matches_base_plus_adapter(run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayquant.cli import main
    from rayquant.models import resolve_model

    result, root = run
    os.environ["HF_HUB_CACHE"] = str(root / "hub")
    try:
        out = CliRunner().invoke(main, ["export", str(result.adapter_dir), "--merged", str(tmp_path / "merged")])
        assert out.exit_code == 0, out.output
        info = json.loads((tmp_path / "merged" / "rayquant_export.json").read_text())
        assert info["adapter_sha256"] == result.manifest["adapter_sha256"] and info["base_model"] == MODEL
        assert info["dtype"] == "bfloat16" and info["check"]["relative"] <= info["check"]["tolerance"]
        names = {p.name for p in (tmp_path / "merged").iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
        assert merged.dtype == torch.bfloat16 and not any("lora" in n for n, _ in merged.named_parameters())
        base = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.bfloat16)
        ids = torch.tensor([[1, 5, 9, 20, 33, 41, 7, 3]])
        with torch.no_grad():
            plain = base(input_ids=ids).logits.float()
            adapted = PeftModel.from_pretrained(base, str(result.adapter_dir))(input_ids=ids).logits.float()
            got = merged(input_ids=ids).logits.float()
        scale = adapted.abs().max()
        assert (got - adapted).abs().max() <= 0.05 * scale
        assert (adapted - plain).abs().max() > 0  # the adapter trained something
        again = CliRunner().invoke(main, ["export", str(result.adapter_dir), "--merged", str(tmp_path / "merged")])
        assert again.exit_code == 2 and "--overwrite" in again.output
    finally:
        os.environ.pop("HF_HUB_CACHE", None)
