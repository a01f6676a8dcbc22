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
           "run": {"max_failures": -1, "max_replans": -2}}
    with pytest.raises(ConfigError) as e:
        parse_train_config(bad)
    text = str(e.value)
    for needle in ("'colour' is not a config key", "lora.typo is not an option", "lora.rank must be",
                   "sft.quantization must be one of", "sft.seq_len must be", "run.max_failures must be", "run.max_replans must be"):
        assert needle in text
    assert len(e.value.problems) == 7


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


# -- YAML numbers: scientific notation is the number it looks like, in every YAML rayquant reads -----

def test_scientific_notation_is_a_number_in_the_train_config(tmp_path):
    """YAML 1.1 (PyYAML) reads `2e-4` as the string '2e-4', which was refused ("got '2e-4'")."""
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "c.yaml").write_text("model: rayquant/tiny-llama\ndataset: d.jsonl\n"
                                     "sft: {learning_rate: 2e-4, weight_decay: 1E-2, max_steps: 1e3, "
                                     "max_grad_norm: .5e1, num_epochs: 1.5e0}\n")
    sft = load_train_config(str(tmp_path / "c.yaml")).sft
    assert sft.learning_rate == 2e-4 and isinstance(sft.learning_rate, float)
    assert (sft.weight_decay, sft.max_grad_norm, sft.num_epochs) == (0.01, 5.0, 1.5)
    assert sft.max_steps == 1000 and isinstance(sft.max_steps, int)  # an integral float, for an integer
    # a quoted value stays a string, and is refused as one; a fraction is no integer
    (tmp_path / "q.yaml").write_text("model: rayquant/tiny-llama\ndataset: d.jsonl\n"
                                     "sft: {learning_rate: '2e-4', max_steps: 2.5e0}\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(str(tmp_path / "q.yaml"))
    assert "sft.learning_rate must be a number in [0.0, 1.0], got '2e-4'" in str(e.value)
    assert "sft.max_steps must be an integer >= 1, got 2.5" in str(e.value)


def test_scientific_notation_in_the_k8s_config_and_inventory_files(tmp_path):
    from rayquant.cli.k8s import _read_config
    from rayquant.inventory import load_inventory_file

    (tmp_path / "job.yaml").write_text("model: rayquant/tiny-llama\nsft: {learning_rate: 1e-5}\n")
    assert _read_config(str(tmp_path / "job.yaml"))["sft"]["learning_rate"] == 1e-5
    (tmp_path / "nodes.yaml").write_text("nodes:\n  - {gpu: A10G, gpus_per_node: 1, count: 2, "
                                         "host_memory_gib: 1.28e2}\n")
    (node,) = load_inventory_file(str(tmp_path / "nodes.yaml"))
    assert node.count == 2 and node.host_memory_bytes == 128 * 2**30


# -- the schema in rayquant/config.py's docstring is the dataclasses' --------------------------------

def test_the_documented_schema_states_the_real_defaults():
    import dataclasses
    import textwrap

    import rayquant.config as config
    from rayquant import yamlio

    doc = config.__doc__
    block = textwrap.dedent(doc[doc.index("::\n") + 3:])
    documented = yamlio.safe_load(block)
    assert list(documented) == list(config.TOP_LEVEL_KEYS)
    for f in dataclasses.fields(config.TrainConfig):
        if f.name in config.OPTION_CLASSES:
            cls = config.OPTION_CLASSES[f.name]
            want = {g.name: g.default for g in dataclasses.fields(cls)}
            got = {k: tuple(v) if isinstance(v, list) else v for k, v in documented[f.name].items()}
            assert got == want, f.name
        elif f.default is not dataclasses.MISSING:
            assert documented[f.name] == f.default, f.name
    assert set(documented) - {f.name for f in dataclasses.fields(config.TrainConfig)} == set()


# -- data, evaluation and tracking keys ---------------------------------------------------------------

def test_data_and_evaluation_keys(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "org").mkdir()  # a folder named like a Hub org does not make `org/name` local
    cfg = parse_train_config({"model": "rayquant/tiny-llama", "dataset": "org/name", "dataset_split": "train",
                              "dataset_subset": "en", "eval_dataset": "d.jsonl",
                              "sft": {"eval_steps": 5, "keep_best": True, "packing": True},
                              "run": {"report_to": ["tensorboard", "mlflow"]}}, base_dir=str(tmp_path))
    assert cfg.dataset == "org/name" and cfg.dataset_subset == "en"  # a Hub id, as written
    assert cfg.eval_dataset == str(tmp_path / "d.jsonl")  # a local file, resolved
    assert cfg.sft.packing and cfg.run.report_to == ("tensorboard", "mlflow")
    assert RunOptions(report_to="tensorboard").report_to == ("tensorboard",)
    with pytest.raises(ConfigError) as e:
        parse_train_config({"model": "rayquant/tiny-llama", "dataset": "d.jsonl", "eval_dataset": "d.jsonl",
                            "eval_dataset_split": 3, "sft": {"eval_fraction": 0.2}}, base_dir=str(tmp_path))
    text = str(e.value)
    assert "eval_dataset and sft.eval_fraction both give evaluation rows" in text
    assert "eval_dataset_split must be a name, got 3" in text
    with pytest.raises(ConfigError) as e:
        parse_train_config({"model": "rayquant/tiny-llama", "dataset": "missing.jsonl",
                            "sft": {"eval_steps": 5, "keep_best": True, "eval_fraction": 0.9},
                            "run": {"report_to": ["tensorbored"]}}, base_dir=str(tmp_path))
    text = str(e.value)
    for needle in ("missing.jsonl does not exist", "sft.eval_fraction must be a number in [0.0, 0.5], got 0.9",
                   "run.report_to must be one of tensorboard, mlflow, wandb, got 'tensorbored'"):
        assert needle in text
    with pytest.raises(ConfigError, match="sft.keep_best needs evaluation rows"):
        parse_train_config({"model": "rayquant/tiny-llama", "dataset": "d.jsonl", "sft": {"keep_best": True}},
                           base_dir=str(tmp_path))


def test_callbacks_must_be_trainer_callbacks_that_travel_to_the_workers():
    import threading

    from transformers import TrainerCallback

    from rayquant.config import ConfigError
    from rayquant.trainer import RayQuantTrainer

    class HoldsALock(TrainerCallback):
        def __init__(self):
            self.lock = threading.Lock()

    with pytest.raises(ConfigError) as e:
        RayQuantTrainer(model="rayquant/tiny-llama", dataset="examples/data/tiny_alpaca.jsonl",
                        callbacks=[print, HoldsALock()])
    text = str(e.value)
    assert "callbacks[0]: expected a transformers TrainerCallback" in text and "builtin_function_or_method" in text
    assert "callbacks[1] (HoldsALock) cannot travel to the workers" in text
    ok = RayQuantTrainer(model="rayquant/tiny-llama", dataset="examples/data/tiny_alpaca.jsonl",
                         callbacks=[TrainerCallback(), TrainerCallback])
    assert len(ok.callbacks) == 2
