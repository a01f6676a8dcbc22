"""Training options (LoRA, SFT, scaling, run) and the `rayquant train` YAML file.

Every options class is a frozen dataclass whose `problems()` lists everything wrong with it, so a
caller can collect the problems of all of them (and of the YAML file) into one ConfigError.

Problems name options as placeholders, `{sft.seq_len}` (and the planner's settings as `{seq_len}`,
planner.vocab): str() of a ConfigError shows the YAML keys, and each face renders its own spelling
(`yaml_spelling`: sft.seq_len; `python_spelling`: sft={"seq_len": ...}; the CLI: its flags).

YAML schema of `rayquant train CONFIG.yaml`. Only `model` and `dataset` are required; every other
key shows its default (tests/test_config.py keeps this block equal to the dataclasses below).
Numbers may be written in scientific notation (`learning_rate: 2e-4`): rayquant.yamlio reads YAML
1.2 numbers, and an integer setting takes an integral float (`max_steps: 1e3`)::

    model: rayquant/tiny-llama        # catalog id, Hugging Face Hub id, local model directory, or
                                      # rayquant/tiny-llama | rayquant/tiny-qwen2 (built offline)
    dataset: data/train.jsonl         # JSON / JSONL / Parquet file, a local directory of data
                                      # files, or a Hub dataset id (org/name)
    dataset_split: null               # the split to train on; null: train (or the only split)
    dataset_subset: null              # the Hub dataset's config (subset) name, if it has several
    eval_dataset: null                # evaluation rows, in the forms `dataset` takes
    eval_dataset_split: null          # null: validation, else test, else the only split
    eval_dataset_subset: null         # null: dataset_subset when eval_dataset is the same dataset
    plan: auto                        # auto | path to a plan JSON written by `rayquant plan --json`
    address: null                     # Ray address; null: RAY_ADDRESS or a local cluster
    calibration: null                 # file from `rayquant calibrate`, applied when plan: auto
    lora:
      rank: 16
      alpha: null                     # null: = rank
      dropout: 0.0
      targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
    sft:
      seq_len: 512                    # tokens per sequence; longer rows are truncated
      global_batch_size: 8            # sequences (packed rows with packing) per optimizer step
      learning_rate: 0.0002
      max_steps: null                 # null: num_epochs over the dataset
      num_epochs: 1.0
      warmup_steps: 0
      lr_scheduler: linear            # linear | cosine | constant | constant_with_warmup
      weight_decay: 0.0
      max_grad_norm: 1.0
      logging_steps: 10
      seed: 0
      dataset_format: auto            # auto | text | messages | alpaca
      text_field: text
      packing: false                  # pack rows into seq_len-token rows (padding-free)
      eval_fraction: 0.0              # hold out this fraction of the dataset for evaluation
      eval_steps: null                # evaluate every N steps; null: once, at the end
      keep_best: false                # publish the adapter of the best eval loss, not the last
      prefer: balanced                # planner preference: balanced | speed | accuracy
      backend: unsloth                # unsloth | hf
      quantization: null              # null: the planner chooses; bf16 | fp16 | nf4 | dynamic-4bit | fp8
      optimizer: null                 # null: the planner chooses; adamw_torch | adamw_8bit | paged_adamw_8bit
      micro_batch_size: null          # null: the planner chooses
      gradient_checkpointing: null    # null: the planner chooses; none | hf | unsloth
    scaling:
      num_workers: null               # null: one per GPU (2 on a CPU-only machine)
      use_gpu: null                   # null: whatever the plan's node types are
      gpus: null                      # plan for a described cluster: "2x8xH100-80GB,4x1xA10G"
      cpus_per_worker: 1
    run:
      name: null                      # null: rayquant-<model>-<timestamp>
      storage_path: ~/rayquant_runs
      output_dir: null                # null: <storage_path>/<name>/adapter
      overwrite: false
      checkpoint_every_steps: null    # null: only at the end
      keep_checkpoints: 2
      max_failures: 0                 # restarts after a worker died or raised (same plan, last checkpoint)
      max_replans: 3                  # restarts with a new plan: out of memory, a node lost (README "Faults")
      resume_anyway: false            # resume this run.name under safe changes (max_steps up)
      report_to: []                   # any of tensorboard, mlflow, wandb (rank 0 logs)
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from planner.vocab import (BACKENDS, CHECKPOINTING, DATASET_FORMATS, DEFAULT_LORA_RANK, DEFAULT_LORA_TARGETS,
                           LR_SCHEDULERS, OPTIMIZERS, PREFERENCES, QUANTIZATIONS, SETTINGS, SettingError,
                           default_lora_alpha)

TOP_LEVEL_KEYS = ("model", "dataset", "dataset_split", "dataset_subset", "eval_dataset", "eval_dataset_split",
                  "eval_dataset_subset", "plan", "address", "calibration", "lora", "sft", "scaling", "run")
DATA_KEYS = ("dataset", "dataset_split", "dataset_subset", "eval_dataset", "eval_dataset_split",
             "eval_dataset_subset")
# run.report_to: the tracking integrations of transformers rayquant passes on (rank 0 logs).
REPORT_TO = ("tensorboard", "mlflow", "wandb")
SECTIONS = ("lora", "sft", "scaling", "run")
# Where each of the planner's neutral settings (planner.vocab.SETTINGS) lives in the YAML config and
# in RayQuantTrainer's arguments; the rest (safety_margin, full_finetune, double_quant) are CLI-only.
SETTING_OPTIONS = {
    "model": "model", "gpus": "scaling.gpus", "calibration": "calibration",
    "seq_len": "sft.seq_len", "global_batch_size": "sft.global_batch_size",
    "micro_batch_size": "sft.micro_batch_size", "quantization": "sft.quantization",
    "optimizer": "sft.optimizer", "gradient_checkpointing": "sft.gradient_checkpointing",
    "prefer": "sft.prefer", "backend": "sft.backend",
    "lora_rank": "lora.rank", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lora_targets": "lora.targets", "output": "run.output_dir", "overwrite": "run.overwrite",
    "resume_anyway": "run.resume_anyway",
}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)\}")


def _is_option(name: str) -> bool:
    section, dot, key = name.partition(".")
    return section in SECTIONS if dot else name in TOP_LEVEL_KEYS


def option_path(name: str) -> str | None:
    """Where a setting lives in the config: 'seq_len' -> 'sft.seq_len'; an option path
    ('sft.learning_rate', 'dataset') is itself; None for a setting the config does not have."""
    return SETTING_OPTIONS.get(name) or (name if _is_option(name) else None)


def setting_of(name: str) -> str | None:
    """The planner's neutral name for a setting or option path ('sft.seq_len' -> 'seq_len')."""
    if name in SETTINGS:
        return name
    return next((s for s, path in SETTING_OPTIONS.items() if path == name), None)


def yaml_spelling(name: str) -> str:
    """A setting as the YAML config names it: sft.seq_len, lora.rank, model."""
    return option_path(name) or name


def python_spelling(name: str) -> str:
    """A setting as RayQuantTrainer's arguments name it: sft={"seq_len": ...}, model."""
    path = option_path(name)
    if path is None:
        return name
    section, dot, key = path.partition(".")
    return f'{section}={{"{key}": ...}}' if dot else path


def render_options(text: str, spell: Callable[[str], str] | None = None) -> str:
    """`text` with each {option} ({sft.seq_len}, {dataset}) and {setting} ({seq_len}) placeholder
    spelled by `spell` (default: the option path, the neutral name); other braces stay."""
    def spelled(m: re.Match) -> str:
        name = m.group(1)
        return (spell or str)(name) if name in SETTINGS or _is_option(name) else m.group(0)

    return _PLACEHOLDER.sub(spelled, text)


class ConfigError(SettingError):
    """One or more configuration problems, all listed, each saying what is wrong and how to fix it.
    `problems` are the neutral texts (YAML names); render(spell) spells every option a face's way."""

    def __init__(self, problems: list[str], what: str = "configuration", fix: str | None = None) -> None:
        self.problems = [render_options(p) for p in problems]
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid {what} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"
                         f"\n{lines}" + (f"\nTo fix: {fix}" if fix else ""))
        self.args = (self.render(),)

    def render(self, spell: Callable[[str], str] | None = None) -> str:
        return render_options(self.template, spell)


def _int_at_least(problems: list[str], name: str, value: Any, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        problems.append(f"{{{name}}} must be an integer >= {low}, got {value!r}")


def _number_in(problems: list[str], name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        problems.append(f"{{{name}}} must be a number in [{low}, {high}], got {value!r}")


def _choice(problems: list[str], name: str, value: Any, choices: tuple, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value not in choices:
        problems.append(f"{{{name}}} must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclass(frozen=True)
class LoraOptions:
    """LoRA adapter shape: rank, alpha (None: planner.vocab.default_lora_alpha, the rank), dropout
    and target modules."""

    rank: int = DEFAULT_LORA_RANK
    alpha: int | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        else:
            object.__setattr__(self, "targets", tuple(self.targets))

    def problems(self) -> list[str]:
        p: list[str] = []
        _int_at_least(p, "lora.rank", self.rank, 1)
        _int_at_least(p, "lora.alpha", self.alpha, 1, allow_none=True)
        _number_in(p, "lora.dropout", self.dropout, 0.0, 0.99)
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            p.append(f"{{lora.targets}} must be a non-empty list of module names (e.g. q_proj, v_proj), "
                     f"got {list(self.targets)!r}")
        return p

    @property
    def effective_alpha(self) -> int:
        return default_lora_alpha(self.rank) if self.alpha is None else self.alpha


@dataclass(frozen=True)
class SftOptions:
    """Supervised fine-tuning settings; planner pins (quantization, optimizer, ...) default to auto."""

    seq_len: int = 512
    global_batch_size: int = 8  # sequences per optimizer step over all workers
    learning_rate: float = 2e-4
    max_steps: int | None = None  # None: num_epochs over the dataset
    num_epochs: float = 1.0
    warmup_steps: int = 0
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Each report waits for Ray Train's controller to take the previous one (it polls every 0.2 s
    # here): reporting every step adds up to that much to fast steps.
    logging_steps: int = 10
    seed: int = 0
    dataset_format: str = "auto"
    text_field: str = "text"
    # Rows packed into seq_len-token rows (TRL's best-fit-decreasing packing, padding-free): no
    # padding, each row still attends only to itself, and its loss mask is kept.
    packing: bool = False
    eval_fraction: float = 0.0  # rows held out of the dataset for evaluation (a seeded split)
    eval_steps: int | None = None  # None: evaluate once, at the end of training
    keep_best: bool = False  # publish the adapter with the best eval loss instead of the last
    prefer: str = "balanced"
    backend: str = "unsloth"
    quantization: str | None = None
    optimizer: str | None = None
    micro_batch_size: int | None = None
    gradient_checkpointing: str | None = None

    def problems(self) -> list[str]:
        p: list[str] = []
        _int_at_least(p, "sft.seq_len", self.seq_len, 8)
        _int_at_least(p, "sft.global_batch_size", self.global_batch_size, 1)
        _number_in(p, "sft.learning_rate", self.learning_rate, 0.0, 1.0)
        _int_at_least(p, "sft.max_steps", self.max_steps, 1, allow_none=True)
        _number_in(p, "sft.num_epochs", self.num_epochs, 0.001, 1e6)
        _int_at_least(p, "sft.warmup_steps", self.warmup_steps, 0)
        _choice(p, "sft.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _number_in(p, "sft.weight_decay", self.weight_decay, 0.0, 1.0)
        _number_in(p, "sft.max_grad_norm", self.max_grad_norm, 0.0, 1e6)
        _int_at_least(p, "sft.logging_steps", self.logging_steps, 1)
        _int_at_least(p, "sft.seed", self.seed, 0)
        _choice(p, "sft.dataset_format", self.dataset_format, DATASET_FORMATS)
        if not isinstance(self.text_field, str) or not self.text_field:
            p.append(f"{{sft.text_field}} must be a column name, got {self.text_field!r}")
        for name in ("packing", "keep_best"):
            if not isinstance(getattr(self, name), bool):
                p.append(f"{{sft.{name}}} must be true or false, got {getattr(self, name)!r}")
        _number_in(p, "sft.eval_fraction", self.eval_fraction, 0.0, 0.5)
        _int_at_least(p, "sft.eval_steps", self.eval_steps, 1, allow_none=True)
        _choice(p, "sft.prefer", self.prefer, PREFERENCES)
        _choice(p, "sft.backend", self.backend, BACKENDS)
        _choice(p, "sft.quantization", self.quantization, QUANTIZATIONS, allow_none=True)
        _choice(p, "sft.optimizer", self.optimizer, OPTIMIZERS, allow_none=True)
        _int_at_least(p, "sft.micro_batch_size", self.micro_batch_size, 1, allow_none=True)
        _choice(p, "sft.gradient_checkpointing", self.gradient_checkpointing, CHECKPOINTING, allow_none=True)
        return p


@dataclass(frozen=True)
class ScalingOptions:
    """How many workers and where. `gpus` ("2x8xH100-80GB,4x1xA10G") plans for a described cluster
    instead of reading the live one; num_workers=None: one per GPU (2 on a CPU-only cluster)."""

    num_workers: int | None = None
    use_gpu: bool | None = None  # None: whatever the plan's node types are
    gpus: str | None = None
    cpus_per_worker: int = 1

    def problems(self) -> list[str]:
        p: list[str] = []
        _int_at_least(p, "scaling.num_workers", self.num_workers, 1, allow_none=True)
        if self.use_gpu is not None and not isinstance(self.use_gpu, bool):
            p.append(f"{{scaling.use_gpu}} must be true, false or null, got {self.use_gpu!r}")
        if self.gpus is not None and (not isinstance(self.gpus, str) or not self.gpus.strip()):
            p.append(f"{{scaling.gpus}} must be a cluster spec like '2x8xH100-80GB,4x1xA10G', got {self.gpus!r}")
        _int_at_least(p, "scaling.cpus_per_worker", self.cpus_per_worker, 1)
        return p


@dataclass(frozen=True)
class RunOptions:
    """Where results go, how often to checkpoint, and how many faults to survive (README "Faults")."""

    name: str | None = None  # None: rayquant-<model>-<timestamp>
    storage_path: str = "~/rayquant_runs"
    output_dir: str | None = None  # None: <storage_path>/<name>/adapter
    # Replace output_dir when it holds a previous rayquant adapter; a folder rayquant did not write
    # is never replaced.
    overwrite: bool = False
    checkpoint_every_steps: int | None = None  # None: only at the end
    keep_checkpoints: int = 2
    max_failures: int = 0  # restarts of the same plan after a worker died or raised an error
    # Restarts with a new plan: a worker ran out of memory (its node type one step cheaper) or a
    # node left the cluster (the nodes left); rayquant.restarts.
    max_replans: int = 3
    # Resume an unfinished run of this name under changes that keep its trained steps valid
    # (max_steps going up, ...; rayquant.identity); any other change is refused.
    resume_anyway: bool = False
    # Tracking through transformers' integrations, from rank 0 only: any of REPORT_TO.
    report_to: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):  # `report_to: tensorboard`, or "tensorboard,mlflow"
            names = [t.strip() for t in self.report_to.split(",") if t.strip()]
            object.__setattr__(self, "report_to", () if names == ["none"] else tuple(names))
        elif isinstance(self.report_to, (list, tuple)):
            object.__setattr__(self, "report_to", tuple(self.report_to))

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.name is not None and (not isinstance(self.name, str) or not self.name
                                      or os.sep in self.name):
            p.append(f"{{run.name}} must be a plain name without '/', got {self.name!r}")
        if not isinstance(self.storage_path, str) or not self.storage_path:
            p.append(f"{{run.storage_path}} must be a directory path, got {self.storage_path!r}")
        if self.output_dir is not None and not isinstance(self.output_dir, str):
            p.append(f"{{run.output_dir}} must be a directory path, got {self.output_dir!r}")
        if not isinstance(self.overwrite, bool):
            p.append(f"{{run.overwrite}} must be true or false, got {self.overwrite!r}")
        if not isinstance(self.resume_anyway, bool):
            p.append(f"{{run.resume_anyway}} must be true or false, got {self.resume_anyway!r}")
        _int_at_least(p, "run.checkpoint_every_steps", self.checkpoint_every_steps, 1, allow_none=True)
        _int_at_least(p, "run.keep_checkpoints", self.keep_checkpoints, 1)
        _int_at_least(p, "run.max_failures", self.max_failures, 0)
        _int_at_least(p, "run.max_replans", self.max_replans, 0)
        if not isinstance(self.report_to, tuple):
            p.append(f"{{run.report_to}} must be a list of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        else:
            for name in self.report_to:
                _choice(p, "run.report_to", name, REPORT_TO)
            if len(set(self.report_to)) != len(self.report_to):
                p.append(f"{{run.report_to}} names an integration twice: {list(self.report_to)}")
        return p


OPTION_CLASSES = {"lora": LoraOptions, "sft": SftOptions, "scaling": ScalingOptions, "run": RunOptions}


def coerce_options(section: str, value: Any, problems: list[str]):
    """An options instance from None, an instance, or a mapping; unknown keys become problems."""
    cls = OPTION_CLASSES[section]
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        problems.append(f"{{{section}}} must be a mapping of options or a {cls.__name__}, got "
                        f"{type(value).__name__}")
        return cls()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known, key=str)
    for key in unknown:
        name = f"{{{section}.{key}}}" if str(key).isidentifier() else f"{section}.{key}"
        problems.append(f"{name} is not an option; known: {', '.join(sorted(known))}")
    integers = _integer_fields(cls)
    try:
        return cls(**{k: _integral(v) if k in integers else v for k, v in value.items() if k in known})
    except TypeError as e:  # the dataclass's own coercion of a value (LoraOptions.targets: tuple(5))
        problems.append(f"{{{section}}}: {e}")
        return cls()


def _integer_fields(cls) -> set[str]:
    """The fields of an options class that hold an integer (or None)."""
    import typing

    return {name for name, hint in typing.get_type_hints(cls).items()
            if hint is int or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                               and int in typing.get_args(hint))}


def _integral(value: Any) -> Any:
    """An integral float as the integer it means (`max_steps: 1e3` reads as 1000.0); any other
    value as it is, for the option's check to judge."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# -- the top-level arguments: one check each for the YAML file and RayQuantTrainer -----------------

DATASET_FORMS = ("a JSON, JSONL or Parquet file, a directory of data files or a Hub dataset id "
                 "(org/name)")


def dataset_problems(dataset: Any, key: str = "dataset") -> list[str]:
    """A dataset must be given; a path must exist, else be a Hub dataset id (read, and checked,
    when the data is loaded; objects too)."""
    from rayquant.models import looks_like_hub_id

    if dataset is None or dataset == "":
        return [f"{{{key}}} is required: {DATASET_FORMS} (from Python also a datasets.Dataset, "
                "ray.data.Dataset or list of dicts)"]
    if isinstance(dataset, (str, os.PathLike)):
        text = str(dataset)
        if not os.path.exists(os.path.expanduser(text)) and not looks_like_hub_id(text):
            return [f"{{{key}}} {dataset} does not exist. To fix: point it at {DATASET_FORMS}"]
    return []


def data_problems(dataset: Any, dataset_split: Any = None, dataset_subset: Any = None,
                  eval_dataset: Any = None, eval_dataset_split: Any = None,
                  eval_dataset_subset: Any = None, sft: "SftOptions | None" = None) -> list[str]:
    """The training and evaluation data arguments, checked together (the rows are read later)."""
    p = dataset_problems(dataset)
    if eval_dataset is not None:
        p += dataset_problems(eval_dataset, "eval_dataset")
    for key, value in (("dataset_split", dataset_split), ("dataset_subset", dataset_subset),
                       ("eval_dataset_split", eval_dataset_split),
                       ("eval_dataset_subset", eval_dataset_subset)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            p.append(f"{{{key}}} must be a split or subset name, got {value!r}")
    fraction = getattr(sft, "eval_fraction", 0.0)
    fraction = fraction if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) else 0.0
    if eval_dataset is not None and fraction > 0:
        p.append("{eval_dataset} and {sft.eval_fraction} both give evaluation rows. To fix: keep one")
    if eval_dataset is None and (eval_dataset_split is not None or eval_dataset_subset is not None):
        p.append("{eval_dataset_split} and {eval_dataset_subset} apply to an {eval_dataset}, and none "
                 "is given. To fix: add {eval_dataset}, or drop them")
    if eval_dataset is None and not fraction and sft is not None:
        for name in ("eval_steps", "keep_best"):
            if getattr(sft, name) not in (None, False):
                p.append(f"{{sft.{name}}} needs evaluation rows. To fix: set {{eval_dataset}} or "
                         f"{{sft.eval_fraction}}, or drop {{sft.{name}}}")
    return p


def plan_problems(plan: Any) -> list[str]:
    """`plan` is auto, a TrainingPlan, or the path of an existing plan JSON."""
    from planner.plan import TrainingPlan

    if isinstance(plan, TrainingPlan) or plan == "auto":
        return []
    if not isinstance(plan, (str, os.PathLike)) or not str(plan):
        return [f"{{plan}} must be auto, a plan JSON path or a TrainingPlan, got {plan!r}"]
    if not os.path.exists(os.path.expanduser(str(plan))):
        return [f"{{plan}} file {plan} does not exist. To fix: write one with `rayquant plan ... "
                f"--json -o FILE`, or plan with auto"]
    return []


def calibration_problems(calibration: Any, plan: Any) -> list[str]:
    """A calibration file (from `rayquant calibrate`) must exist, and applies only when planning."""
    if calibration is None:
        return []
    if not isinstance(calibration, (str, os.PathLike)) or not str(calibration):
        return [f"{{calibration}} must be the path of a file from `rayquant calibrate`, got {calibration!r}"]
    if not os.path.isfile(os.path.expanduser(str(calibration))):
        return [f"{{calibration}} file {calibration} does not exist. To fix: write one with "
                f"`rayquant calibrate --model M -o FILE` on a GPU machine, or drop it"]
    if plan != "auto":
        return ["{calibration} applies when rayquant plans ({plan} auto); a given plan was made "
                "already. To fix: drop {calibration}, or make the plan with it (`rayquant plan ... "
                "--calibration FILE`)"]
    return []


def address_problems(address: Any) -> list[str]:
    if address is not None and not isinstance(address, str):
        return [f"{{address}} must be a Ray address like 'ray://head:10001' or 'head:6379', got {address!r}"]
    return []


@dataclass(frozen=True)
class TrainConfig:
    """The contents of a `rayquant train` YAML file, validated."""

    model: str
    dataset: str  # a local path (resolved) or a Hub dataset id
    dataset_split: str | None = None
    dataset_subset: str | None = None
    eval_dataset: str | None = None
    eval_dataset_split: str | None = None
    eval_dataset_subset: str | None = None
    plan: str = "auto"
    address: str | None = None
    calibration: str | None = None  # a `rayquant calibrate` file the plan applies (plan: auto)
    lora: LoraOptions = field(default_factory=LoraOptions)
    sft: SftOptions = field(default_factory=SftOptions)
    scaling: ScalingOptions = field(default_factory=ScalingOptions)
    run: RunOptions = field(default_factory=RunOptions)


CONFIG_FIX = ("correct these keys (each is documented in rayquant/config.py; examples/quickstart.yaml "
              "is a complete example), then check with `rayquant train CONFIG.yaml --dry-run`")


def resolve_path(path: str, base_dir: str) -> str:
    """A path from a config file: ~ expanded, relative paths against the file's directory."""
    expanded = os.path.expanduser(path)
    return expanded if os.path.isabs(expanded) else os.path.normpath(os.path.join(base_dir, expanded))


def resolve_reference(ref: str, base_dir: str) -> str:
    """A model or dataset from a config file: a path that exists (relative to the file's directory,
    or starting with ., / or ~) resolved as resolve_path does; anything else (a Hub or catalog id,
    `org/name`) as written."""
    from rayquant.models import looks_like_hub_id

    resolved = resolve_path(ref, base_dir)
    if ref.startswith((".", "/", "~")) or os.path.exists(resolved) or not looks_like_hub_id(ref):
        return resolved
    return ref


def parse_train_config(raw: Any, base_dir: str = ".") -> TrainConfig:
    """Validate a parsed YAML mapping; relative dataset/plan/calibration paths resolve against
    `base_dir`."""
    from rayquant.models import model_problems

    problems: list[str] = []
    if not isinstance(raw, Mapping):
        raise ConfigError([f"the file must hold a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, "
                           f"got {type(raw).__name__}"], "training config", CONFIG_FIX)
    for key in sorted(set(raw) - set(TOP_LEVEL_KEYS), key=str):
        problems.append(f"{key!r} is not a config key; known: {', '.join(TOP_LEVEL_KEYS)}")

    def text(key: str, default: str | None = None) -> tuple[str | None, bool]:
        value = raw.get(key, default)
        if value is None or isinstance(value, str):
            return value, True
        what = {"model": "model id or directory", "dataset": "path or Hub dataset id",
                "eval_dataset": "path or Hub dataset id"}.get(key, "name" if key in DATA_KEYS else "path")
        problems.append(f"{{{key}}} must be a {what}, got {value!r}")
        return None, False

    model, ok = text("model")
    if ok:
        if model and (model.startswith((".", "/", "~")) or os.path.exists(os.path.join(base_dir, model))):
            model = resolve_path(model, base_dir)
        problems += model_problems(model)
    data: dict[str, Any] = {}
    wrong = set()  # keys of the wrong type, said once above
    for key in DATA_KEYS:
        value, ok = text(key)
        if ok and key in ("dataset", "eval_dataset") and value:
            value = resolve_reference(value, base_dir)
        data[key] = value if ok else None
        if not ok:
            wrong.add(key)
    plan, ok = text("plan", "auto")
    if ok:
        plan = resolve_path(plan, base_dir) if plan and plan != "auto" else plan
        problems += plan_problems(plan)
    calibration, ok = text("calibration")
    if ok:
        calibration = resolve_path(calibration, base_dir) if calibration else calibration
        problems += calibration_problems(calibration, plan)
    problems += address_problems(raw.get("address"))
    options = {s: coerce_options(s, raw.get(s), problems) for s in OPTION_CLASSES}
    for opt in options.values():
        problems.extend(opt.problems())
    problems += [p for p in data_problems(**data, sft=options["sft"])
                 if not any(p.startswith(f"{{{key}}} ") for key in wrong)]
    if problems:
        raise ConfigError(problems, "training config", CONFIG_FIX)
    return TrainConfig(model=model, plan=plan, address=raw.get("address"), calibration=calibration,
                       **data, **options)


def planning_config(data: Mapping[str, Any], base_dir: str = ".") -> tuple[LoraOptions, SftOptions, str | None]:
    """What planning reads from a `rayquant train` config mapping (`rayquant k8s` plans from one
    without loading it as a training run): its lora and sft options and its calibration file
    (resolved against `base_dir`), checked; ConfigError lists every problem."""
    problems: list[str] = []
    lora = coerce_options("lora", data.get("lora"), problems)
    sft = coerce_options("sft", data.get("sft"), problems)
    problems += lora.problems() + sft.problems()
    calibration = data.get("calibration")
    if isinstance(calibration, str) and calibration:
        calibration = resolve_path(calibration, base_dir)
    problems += calibration_problems(calibration, "auto")
    if problems:
        raise ConfigError(problems, "training config", CONFIG_FIX)
    return lora, sft, calibration


def load_train_config(path: str) -> TrainConfig:
    """Read and validate a `rayquant train` YAML file (all problems reported at once)."""
    import yaml

    from rayquant import yamlio

    try:
        with open(path, encoding="utf-8") as f:
            data = yamlio.safe_load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path} does not exist"], "training config",
                          "pass an existing file; examples/quickstart.yaml is a starting point") from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path} is not valid YAML: {e}"], "training config",
                          "correct the YAML syntax at the line shown") from None
    return parse_train_config(data, base_dir=os.path.dirname(os.path.abspath(path)))
