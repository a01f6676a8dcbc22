"""The driver-worker contract: what the driver hands every Ray Train worker (WorkerConfig) and what
each worker hands back (WorkerStats), as frozen values with a strict JSON round trip.

Driver and workers are separate processes, on a cluster separate machines that may run different
images, so what crosses between them is a typed value rather than a string-keyed dict: a field
renamed on one side fails in a test (tests/test_contract.py) instead of a run, and a mismatch that
reaches a run fails on arrival, naming every missing and unknown field. The module needs only the
standard library and the planner, so the driver, the workers and the tests import it cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from planner.plan import TrainingPlan
from planner.vocab import DATASET_FORMATS, LR_SCHEDULERS

if TYPE_CHECKING:
    from rayquant.config import SftOptions

WORKER_STATS_FILE = "worker_stats.json"  # beside each rank's final adapter in its checkpoint
_SAME_VERSION = "the driver and every worker must run the same rayquant version"


class ContractError(ValueError):
    """A WorkerConfig or WorkerStats that does not match this rayquant's fields or their types."""


def _check_keys(cls: type, data: Any, what: str) -> None:
    """Raise ContractError naming every missing and unknown field of `data` for dataclass `cls`."""
    if not isinstance(data, Mapping):
        raise ContractError(f"{what} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = {name for name, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing, unknown = sorted(required - data.keys()), sorted(data.keys() - fields.keys())
    problems = ([f"missing field(s) {', '.join(missing)}"] if missing else []) + (
        [f"unknown field(s) {', '.join(unknown)}"] if unknown else [])
    if problems:
        raise ContractError(f"{what} does not match {cls.__name__}: {'; '.join(problems)}. "
                            f"To fix: {_SAME_VERSION}.")


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether `value` has type `hint` (the few forms this module's fields use; not a general checker)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:  # JSON writes 2.0 as 2.0, but a float field may well be handed an int
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return len(value) == len(args) and all(_type_ok(v, h) for v, h in zip(value, args))
    if origin is not None:  # Mapping[...]: keys and values are checked where they matter
        return isinstance(value, origin)
    return isinstance(value, hint)


def _check_types(obj: Any) -> list[str]:
    hints = typing.get_type_hints(type(obj))
    return [f"{f.name} must be {hints[f.name]}, got {getattr(obj, f.name)!r}"
            for f in dataclasses.fields(obj) if not _type_ok(getattr(obj, f.name), hints[f.name])]


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise ContractError(f"invalid {what}: " + "; ".join(problems))


# -- driver -> workers ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SftSettings:
    """The SFTTrainer settings every rank applies alike, resolved on the driver (steps counted, data
    format detected); what differs per rank (micro-batch, accumulation, optimizer) is its NodePlan's."""

    max_steps: int  # optimizer steps of the whole run (the driver turns epochs into steps)
    seq_len: int
    dataset_format: str  # the prepared data's format: text, messages or alpaca (tokenized on the driver)
    learning_rate: float
    lr_scheduler: str
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    logging_steps: int
    seed: int
    checkpoint_every_steps: int | None = None  # None: no checkpoints during training
    # The rows are packed seq_len-token rows (tokenized and packed on the driver): batches are
    # collated padding-free (position_ids restart per sequence, no attention mask).
    packing: bool = False
    evaluate: bool = False  # eval rows travel beside the training rows
    eval_steps: int | None = None  # with evaluate: every N steps; None: once, at the end
    keep_best: bool = False  # publish the adapter of the best eval loss
    report_to: tuple[str, ...] = ()  # transformers' integrations rank 0 reports to
    run_name: str | None = None  # the run's name, shared by every tracker

    def __post_init__(self) -> None:
        if isinstance(self.report_to, list):  # JSON's list
            object.__setattr__(self, "report_to", tuple(self.report_to))
        problems = _check_types(self)
        if not problems:
            for name in ("max_steps", "seq_len", "logging_steps"):
                if getattr(self, name) < 1:
                    problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
                problems.append(f"checkpoint_every_steps must be >= 1 or None, got {self.checkpoint_every_steps}")
            if self.eval_steps is not None and (self.eval_steps < 1 or not self.evaluate):
                problems.append(f"eval_steps must be >= 1 and needs evaluate, got {self.eval_steps}")
            if self.keep_best and not self.evaluate:
                problems.append("keep_best needs evaluate")
            if self.dataset_format not in DATASET_FORMATS or self.dataset_format == "auto":
                problems.append(f"dataset_format must be a detected format, got {self.dataset_format!r}")
            if self.lr_scheduler not in LR_SCHEDULERS:
                problems.append(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, "
                                f"got {self.lr_scheduler!r}")
        _raise_if(problems, "SftSettings")

    @classmethod
    def from_options(cls, sft: SftOptions, *, max_steps: int, seq_len: int, dataset_format: str,
                     checkpoint_every_steps: int | None = None, evaluate: bool = False,
                     report_to: tuple[str, ...] = (), run_name: str | None = None) -> "SftSettings":
        """From rayquant.config.SftOptions: its trainer settings, with what the driver resolved
        (`evaluate`: whether eval rows travel; `report_to`: the integrations that can run)."""
        return cls(max_steps=max_steps, seq_len=seq_len, dataset_format=dataset_format,
                   learning_rate=sft.learning_rate, lr_scheduler=sft.lr_scheduler,
                   warmup_steps=sft.warmup_steps, weight_decay=sft.weight_decay,
                   max_grad_norm=sft.max_grad_norm, logging_steps=sft.logging_steps, seed=sft.seed,
                   checkpoint_every_steps=checkpoint_every_steps, packing=sft.packing,
                   evaluate=evaluate, eval_steps=sft.eval_steps if evaluate else None,
                   keep_best=sft.keep_best and evaluate, report_to=tuple(report_to), run_name=run_name)

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), report_to=list(self.report_to))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SftSettings":
        _check_keys(cls, data, "SftSettings")
        return cls(**data)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a Ray Train worker is told: the plan (it finds its own rank's settings there), the
    model, the trainer settings and where each rank must run.

    The dataset is not part of it: it travels beside it in the train loop's config as a Ray object
    reference (rayquant.trainer), which has no JSON form and must not be copied into every config.
    """

    plan: TrainingPlan
    # As the user named it: each worker resolves it on its own node (a tiny id is built into that
    # node's cache, a hub id read from that node's hub cache).
    model: str
    sft: SftSettings
    # One Ray label selector per rank (rayquant.placement), which each worker re-checks before it
    # loads weights; None where the local machine is the whole cluster.
    label_selectors: tuple[Mapping[str, str], ...] | None = None
    # The run's options as the user gave them (lora, sft, scaling, run, model, dataset), plain JSON
    # values: what rank 0 logs as the trackers' parameters beside the plan.
    run_config: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.label_selectors, (list, tuple)):
            object.__setattr__(self, "label_selectors", tuple(
                dict(s) if isinstance(s, Mapping) else s for s in self.label_selectors))
        problems = _check_types(self)
        if not problems:
            if self.sft.seq_len != self.plan.job.seq_len:
                problems.append(f"sft.seq_len {self.sft.seq_len} is not the plan's seq_len "
                                f"{self.plan.job.seq_len}")
            if self.label_selectors is not None and len(self.label_selectors) != self.plan.num_workers:
                problems.append(f"{len(self.label_selectors)} label selectors for {self.plan.num_workers} workers")
        _raise_if(problems, "WorkerConfig")

    def to_dict(self) -> dict[str, Any]:
        selectors = None if self.label_selectors is None else [dict(s) for s in self.label_selectors]
        return {"plan": self.plan.to_dict(), "model": self.model, "sft": self.sft.to_dict(),
                "label_selectors": selectors,
                "run_config": None if self.run_config is None else dict(self.run_config)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "WorkerConfig":
        _check_keys(cls, data, "WorkerConfig")
        try:
            plan = TrainingPlan.from_dict(data["plan"])
        except (KeyError, TypeError, AttributeError) as e:
            raise ContractError(f"WorkerConfig.plan is not a rayquant plan ({type(e).__name__}: {e}). "
                                f"To fix: {_SAME_VERSION}.") from None
        return cls(plan=plan, model=data["model"],
                   sft=SftSettings.from_dict(data["sft"]),
                   label_selectors=data.get("label_selectors"), run_config=data.get("run_config"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "WorkerConfig":
        return cls.from_dict(json.loads(text))


# -- workers -> driver ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceInfo:
    """The device a worker trained on, as it checked it against its plan (rayquant.worker.device)."""

    device: str  # "cpu" or "cuda:<index>"
    name: str  # "CPU" or the CUDA device's name
    memory_bytes: int | None = None  # a GPU's total memory
    cpus: int | None = None  # on CPU: the machine's CPU count

    def __post_init__(self) -> None:
        _raise_if(_check_types(self), "DeviceInfo")

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that apply to this kind of device (the manifest shows this)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DeviceInfo":
        _check_keys(cls, data, "DeviceInfo")
        return cls(**data)


@dataclass(frozen=True)
class QuantizationReport:
    """The quantization one worker planned, used and still held after training (for the manifest)."""

    planned: str
    used: str  # differs from planned where the device could not run it (Unsloth's CPU fallback)
    # The scheme's own figures, named as in the manifest (rayquant.loading.quantization_report):
    # 4-bit layer count, FP8 modules and bytes, dynamic 4-bit's protected modules with their reasons,
    # cost and budget; a scheme reports only the figures that apply to it.
    details: Mapping[str, Any]
    modules_after_training: Mapping[str, int]  # quantized base linears per kind when training ended

    def __post_init__(self) -> None:
        object.__setattr__(self, "details", dict(self.details))
        object.__setattr__(self, "modules_after_training", dict(self.modules_after_training))
        problems = _check_types(self)
        clash = sorted({"planned", "used", "modules_after_training"} & self.details.keys())
        if clash:
            problems.append(f"details must not repeat {', '.join(clash)}")
        _raise_if(problems, "QuantizationReport")

    def to_manifest(self) -> dict[str, Any]:
        return {"planned": self.planned, "used": self.used, **self.details,
                "modules_after_training": dict(self.modules_after_training)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantizationReport":
        _check_keys(cls, data, "QuantizationReport")
        return cls(**data)


@dataclass(frozen=True)
class WorkerStats:
    """What one rank reports when training ends: where it ran, what it ran with, what it measured
    (next to the plan's prediction) and the hash of the adapter it saved."""

    rank: int
    node_type: str
    hostname: str
    node_id: str  # Ray's node id
    device: DeviceInfo
    placement: str
    engine: str  # the class that wrapped the model (DistributedDataParallel, DeepSpeedEngine)
    quantization: QuantizationReport
    optimizer_planned: str
    optimizer_used: str  # the optimizer class that ran
    micro_batch_size: int
    gradient_accumulation_steps: int
    shard_rows: int
    global_steps: int
    resumed_from_step: int | None  # the checkpoint's step when this run resumed, else None
    trainable_parameters: int
    adapter_dtype: str
    peak_memory_bytes: int
    peak_memory_source: str  # how it was measured (CUDA allocator peak, or the process's peak RSS)
    predicted_peak_memory_bytes: int
    train_s: float
    tokens_per_s: float
    predicted_tokens_per_s: float
    losses: tuple[tuple[int, float], ...]  # (step, loss) at every logging step, across restarts
    adapter_sha256: str
    # (step, eval loss) at every evaluation: token-weighted over every rank's eval rows, so equal on
    # every rank; with the tokens one evaluation covered.
    eval_losses: tuple[tuple[int, float], ...] = ()
    eval_tokens: int = 0
    adapter_step: int | None = None  # the step of the adapter saved (the best eval's with keep_best)
    # Why training stopped before max_steps (a non-finite loss), None when it ran to the end.
    stopped: str | None = None

    def __post_init__(self) -> None:
        for name in ("losses", "eval_losses"):  # JSON's [[step, loss], ...] as tuples
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(tuple(x) if isinstance(x, (list, tuple)) else x
                                                     for x in value))
        _raise_if(_check_types(self), f"WorkerStats of rank {self.rank}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["device"] = self.device.to_dict()
        d["losses"] = [[s, v] for s, v in self.losses]
        d["eval_losses"] = [[s, v] for s, v in self.eval_losses]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "WorkerStats":
        what = f"WorkerStats of rank {data.get('rank', '?')}" if isinstance(data, Mapping) else "WorkerStats"
        _check_keys(cls, data, what)
        return cls(**dict(data, device=DeviceInfo.from_dict(data["device"]),
                          quantization=QuantizationReport.from_dict(data["quantization"])))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "WorkerStats":
        return cls.from_dict(json.loads(text))


# -- a worker that ran out of memory -> driver ------------------------------------------------------

@dataclass(frozen=True)
class OutOfMemoryReport:
    """What a worker saw when torch ran out of memory (rayquant.worker.oom), for the driver's re-plan
    and restart record."""

    rank: int
    node_type: str
    step: int | None  # the optimizer steps done when it failed; None while loading
    device: str  # "cpu" or "cuda:<index>"
    seen_bytes: int  # what the worker held: CUDA max allocated, or the process's peak RSS on CPU
    seen_source: str
    capacity_bytes: int | None  # the GPU's total memory; None on CPU
    reserved_bytes: int | None  # CUDA max reserved; None on CPU
    message: str  # torch's error message

    def __post_init__(self) -> None:
        _raise_if(_check_types(self), "OutOfMemoryReport")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "OutOfMemoryReport":
        data = json.loads(text)
        _check_keys(cls, data, "OutOfMemoryReport")
        return cls(**data)


class WorkerOutOfMemory(RuntimeError):
    """Raised by a worker in place of torch.OutOfMemoryError (which stays its __cause__), carrying an
    OutOfMemoryReport to the driver; it travels as the report's JSON."""

    def __init__(self, report_json: str) -> None:
        self.report = OutOfMemoryReport.from_json(report_json)
        super().__init__(f"rank {self.report.rank} ({self.report.node_type}) ran out of memory"
                         + (f" at step {self.report.step}" if self.report.step is not None else " while loading")
                         + f": {self.report.message}")

    def __reduce__(self):
        return (type(self), (self.report.to_json(),))
