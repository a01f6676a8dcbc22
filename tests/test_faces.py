"""One planning service behind every face: `rayquant plan` flags, a YAML config through
`rayquant train --dry-run` and `rayquant k8s`, and RayQuantTrainer's arguments give the same JobSpec
and the same plan for the same settings; a YAML `calibration:` reaches the plan of train and k8s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from planner.calibration import Calibration, Measurement
from planner.plan import TrainingPlan
from rayquant.cli import main

GIB = 2**30
MODEL = "meta-llama/Llama-3.1-8B"
GPUS = "1x2xA10G,1x1xL4"
LORA = {"rank": 8, "targets": ["q_proj", "v_proj"]}
SFT = {"seq_len": 1024, "global_batch_size": 12, "prefer": "speed", "backend": "unsloth",
       "quantization": "nf4"}
PLAN_FLAGS = ["plan", "-m", MODEL, "--gpus", GPUS, "--lora-rank", "8", "--lora-targets", "q_proj,v_proj",
              "--seq-len", "1024", "--global-batch", "12", "--prefer", "speed", "--backend", "unsloth",
              "--quantization", "nf4", "--json"]


@pytest.fixture(autouse=True)
def catalog_model_in_the_hub_cache(hub_cache, tiny_tokenizer_files):
    """`train --dry-run` checks the model can be had (offline here): MODEL's config, a tokenizer and
    weights in a Hub cache (the plan itself comes from the catalog)."""
    from conftest import write_hub_repo

    config = json.dumps({"model_type": "llama", "max_position_embeddings": 131072}).encode()
    write_hub_repo(hub_cache, MODEL, {"config.json": config, "model.safetensors": b"not read by a dry run",
                                      **tiny_tokenizer_files})


def _invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result


def _config(tmp_path: Path, **extra) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(40)))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "dataset": "train.jsonl", "lora": LORA, "sft": SFT,
                                    "scaling": {"gpus": GPUS}, **extra}, sort_keys=False))
    return path


def _k8s_plan(config: Path, *extra: str) -> tuple[TrainingPlan, dict]:
    out = _invoke("k8s", "--config", str(config), "--gpus", GPUS, "--image", "img:1", "--storage", "pvc",
                  "--dataset-in-pod", "/data/train.jsonl", "--hf-token-secret", "hf-token", *extra).output
    configmap = next(yaml.safe_load_all(out))
    return TrainingPlan.from_json(configmap["data"]["plan.json"]), yaml.safe_load(configmap["data"]["train.yaml"])


def _dry_run_plan(config: Path) -> TrainingPlan:
    return TrainingPlan.from_dict(json.loads(_invoke("train", str(config), "--dry-run", "--json").output)["plan"])


def test_the_three_faces_give_one_job_spec_and_one_plan(tmp_path):
    from rayquant.trainer import RayQuantTrainer

    config = _config(tmp_path)
    cli = TrainingPlan.from_json(_invoke(*PLAN_FLAGS).output)
    k8s, _ = _k8s_plan(config)
    dry_run = _dry_run_plan(config)
    trainer = RayQuantTrainer(model=MODEL, dataset=str(tmp_path / "train.jsonl"), lora=LORA, sft=SFT,
                              scaling={"gpus": GPUS})
    assert cli.job == k8s.job == dry_run.job == trainer.job_spec() == trainer.plan().job
    # One LoRA alpha default on every path: the rank (planner.vocab.default_lora_alpha).
    assert cli.job.lora_alpha == 8
    assert cli == k8s == dry_run == trainer.plan()


def test_a_yaml_calibration_reaches_the_plans_of_train_and_k8s(tmp_path):
    cal = tmp_path / "calibration.json"
    measured = dict(gpu="A10G", quantization="nf4", model=MODEL, seq_len=1024, micro_batch_size=1,
                    predicted_peak_bytes=11 * GIB, predicted_allocated_bytes=10 * GIB,
                    measured_allocated_bytes=12 * GIB, measured_reserved_bytes=13 * GIB,
                    predicted_tokens_per_second=1000.0, measured_tokens_per_second=500.0)
    Calibration((Measurement(**measured),)).save(cal)
    plain = _dry_run_plan(_config(tmp_path))
    config = _config(tmp_path, calibration="calibration.json")  # relative to the config file
    flags = TrainingPlan.from_json(_invoke(*PLAN_FLAGS, "--calibration", str(cal)).output)
    dry_run = _dry_run_plan(config)
    k8s, mounted = _k8s_plan(config)
    assert dry_run == k8s == flags != plain
    a10g = [p for p in dry_run.node_plans if p.gpu == "A10G"][0]
    assert a10g.tokens_per_second == pytest.approx(
        [p for p in plain.node_plans if p.gpu == "A10G"][0].tokens_per_second * 0.5, rel=0.3)
    # The pods run the mounted plan, which applied the calibration already: no local path travels.
    assert "calibration" not in mounted and mounted["plan"] == "/etc/rayquant/plan.json"


def test_a_calibration_the_config_cannot_use_is_refused_with_its_yaml_key(tmp_path):
    missing = CliRunner().invoke(main, ["train", str(_config(tmp_path, calibration="nope.json")), "--dry-run"])
    assert missing.exit_code == 2 and "calibration file" in missing.output and "nope.json does not exist" in missing.output
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(_invoke(*PLAN_FLAGS).output)
    (tmp_path / "cal.json").write_text("{}")
    given = CliRunner().invoke(main, ["train", str(_config(tmp_path, calibration="cal.json", plan="plan.json")),
                                      "--dry-run"])
    assert given.exit_code == 2 and "calibration applies when rayquant plans (plan auto)" in given.output
    k8s = CliRunner().invoke(main, ["k8s", "--config", str(_config(tmp_path, calibration="gone.json")),
                                    "--gpus", GPUS, "--image", "i", "--storage", "pvc",
                                    "--dataset-in-pod", "/d.jsonl"])
    assert k8s.exit_code == 2 and "gone.json does not exist" in k8s.output and "Traceback" not in k8s.output


def test_the_trainer_takes_a_calibration_file(tmp_path):
    from rayquant.config import ConfigError
    from rayquant.trainer import RayQuantTrainer

    with pytest.raises(ConfigError, match="calibration file .*missing.json does not exist"):
        RayQuantTrainer(model=MODEL, dataset=str(_config(tmp_path).parent / "train.jsonl"),
                        calibration=str(tmp_path / "missing.json"))
