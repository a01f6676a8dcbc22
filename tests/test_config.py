"""Training options and the `rayquant train` YAML: every problem reported at once."""

from __future__ import annotations

import pytest

from rayquant.config import (ConfigError, LoraOptions, RunOptions, SftOptions, load_train_config,
                             parse_train_config)


def test_quickstart_config_is_valid():
    cfg = load_train_config("examples/quickstart.yaml")
    assert cfg.model == "rayquant/tiny-llama"
    assert cfg.dataset.endswith("examples/data/tiny_alpaca.jsonl")
    assert cfg.scaling.num_workers == 2
    assert (cfg.sft.quantization, cfg.sft.optimizer) == ("nf4", "adamw_8bit")
    assert cfg.lora == LoraOptions(rank=8, alpha=16)


def test_all_problems_listed_together(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    bad = {"model": "rayquant/tiny-llama", "dataset": str(data), "colour": "red",
           "lora": {"rank": 0, "typo": 1}, "sft": {"quantization": "int3", "seq_len": 4},
           "run": {"max_failures": -1}}
    with pytest.raises(ConfigError) as e:
        parse_train_config(bad)
    text = str(e.value)
    for needle in ("'colour' is not a config key", "lora.typo is not an option", "lora.rank must be",
                   "sft.quantization must be one of", "sft.seq_len must be", "run.max_failures must be"):
        assert needle in text
    assert len(e.value.problems) == 6


def test_missing_required_and_paths(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_train_config({"plan": "nope.json"}, base_dir=str(tmp_path))
    text = str(e.value)
    assert "model is required" in text and "dataset is required" in text
    assert "plan file" in text and "nope.json" in text


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "c.yaml").write_text("model: rayquant/tiny-qwen2\ndataset: data/x.jsonl\n")
    cfg = load_train_config(str(tmp_path / "c.yaml"))
    assert cfg.dataset == str(tmp_path / "data" / "x.jsonl")
    assert cfg.sft == SftOptions() and cfg.run == RunOptions()


def test_bad_yaml_is_a_config_error(tmp_path):
    (tmp_path / "c.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(str(tmp_path / "c.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(str(tmp_path / "missing.yaml"))


def test_lora_targets_from_a_comma_string():
    assert LoraOptions(targets="q_proj, v_proj").targets == ("q_proj", "v_proj")
    # One alpha default on every path: the trainer's options and the planner's JobSpec agree.
    from planner.plan import JobSpec

    assert LoraOptions(rank=8).effective_alpha == JobSpec(lora_rank=8).effective_lora_alpha == 8


def test_trainer_arguments_collect_every_problem(tmp_path):
    from rayquant.trainer import RayQuantTrainer

    with pytest.raises(ConfigError) as e:
        RayQuantTrainer(model="rayquant/tiny-gpt9", dataset=str(tmp_path / "none.jsonl"),
                        plan=str(tmp_path / "plan.json"), sft={"learning_rate": -1},
                        scaling={"num_workers": 0}, run={"name": "a/b"})
    text = str(e.value)  # the trainer's face: options spelled as its arguments
    for needle in ("tiny models are", "none.jsonl does not exist", "plan file", "plan.json does not exist",
                   'sft={"learning_rate": ...} must be', 'scaling={"num_workers": ...}', 'run={"name": ...}'):
        assert needle in text
    assert "sft.learning_rate" not in text
    # A face wrapping the trainer renders its own spelling from the same error.
    from rayquant.config import yaml_spelling

    assert "sft.learning_rate must be" in e.value.render(yaml_spelling)
