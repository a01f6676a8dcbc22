"""The planner's output: a TrainingPlan, a frozen value that round-trips through JSON.

A plan holds one NodePlan per node type (the settings every worker on that type applies) and one
WorkerAssignment per Ray Train worker (world rank -> node type). Workers look themselves up by rank.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from planner.atomic import WRITTEN_BY
from planner.vocab import (BACKENDS, CHECKPOINTING, DEFAULT_LORA_RANK, DEFAULT_LORA_TARGETS, OPTIMIZERS,
                           PLACEMENTS, PREFERENCES, QUANTIZATIONS, SettingError, default_lora_alpha)

PLAN_FORMAT_VERSION = 1


class PlanError(SettingError):
    """Nothing (or not the asked-for thing) fits, or a planner input is invalid: the message says
    what is missing and how to fix it, naming settings as {placeholders} each face spells its way."""


def _check_choice(problems: list[str], name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        problems.append(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise PlanError(f"invalid {what}: " + "; ".join(problems))


@dataclass(frozen=True)
class JobSpec:
    """What the user asks for: sequence length, global batch, LoRA and a preference."""

    seq_len: int = 2048
    global_batch_size: int = 16  # sequences per optimizer step, summed over all workers
    lora_rank: int = DEFAULT_LORA_RANK
    lora_alpha: int | None = None  # None: planner.vocab.default_lora_alpha(lora_rank)
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    full_finetune: bool = False
    prefer: str = "balanced"
    backend: str = "unsloth"
    safety_margin: float = 0.10  # fraction of each GPU's memory the plan keeps free
    # Pins: None lets the planner choose; a value forces that choice on every node type (and the
    # planner says when it does not fit rather than silently picking something else).
    quantization: str | None = None
    optimizer: str | None = None
    micro_batch_size: int | None = None
    gradient_checkpointing: str | None = None
    double_quant: bool = True
    # Rows packed into seq_len-token rows (sft.packing): every row is ~seq_len real tokens (no
    # padding); attention stays within each packed sequence. Memory per row is still seq_len's.
    packing: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        problems: list[str] = []
        if self.seq_len < 1:
            problems.append(f"seq_len must be >= 1, got {self.seq_len}")
        if self.global_batch_size < 1:
            problems.append(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if not self.full_finetune and self.lora_rank < 1:
            problems.append(f"lora_rank must be >= 1, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.safety_margin < 0.9:
            problems.append(f"safety_margin must be in [0, 0.9), got {self.safety_margin}")
        if not self.full_finetune and not self.lora_targets:
            problems.append("lora_targets is empty: name modules (q_proj,v_proj,...) or 'all'")
        _check_choice(problems, "prefer", self.prefer, PREFERENCES)
        _check_choice(problems, "backend", self.backend, BACKENDS)
        for name, choices in (("quantization", QUANTIZATIONS), ("optimizer", OPTIMIZERS),
                              ("gradient_checkpointing", CHECKPOINTING)):
            if getattr(self, name) is not None:
                _check_choice(problems, name, getattr(self, name), choices)
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            problems.append(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _raise_if(problems, "job")

    @property
    def effective_lora_alpha(self) -> int:
        return default_lora_alpha(self.lora_rank) if self.lora_alpha is None else self.lora_alpha


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak GPU memory of one worker, bytes per named term (see planner.memory for each formula)."""

    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class NodePlan:
    """Settings for every worker on one node type, and why each was chosen."""

    node_type: str  # key of the node type, e.g. "H100-80GB:8" (GPU catalog name : GPUs per node)
    gpu: str  # GPU catalog name
    nodes: int
    gpus_per_node: int
    quantization: str  # one of QUANTIZATIONS
    compute_dtype: str  # "bfloat16" or "float16"
    micro_batch_size: int
    gradient_accumulation_steps: int
    optimizer: str  # one of OPTIMIZERS
    gradient_checkpointing: str  # one of CHECKPOINTING
    placement: str  # one of PLACEMENTS
    backend: str  # one of BACKENDS
    workers_per_node: int
    gpus_per_worker: int
    peak_memory_bytes: int  # predicted peak of one worker on its busiest GPU
    memory_budget_bytes: int  # GPU memory minus the safety margin
    breakdown: MemoryBreakdown
    tokens_per_second: float  # predicted, per worker
    reasons: Mapping[str, str]  # choice -> one-line reason ("quantization": "...", ...)
    double_quant: bool = True
    fp8_path: str | None = None  # "unsloth" (load_in_fp8) or "rowwise" (our scaled-mm linear)
    # Spare bytes per worker that dynamic 4-bit may spend keeping sensitive modules in 16-bit.
    protected_budget_bytes: int = 0
    # node-spanning placement: module name -> local GPU index (passed to Unsloth as a dict).
    device_map: Mapping[str, int] | None = None
    host_memory_bytes: int = 0  # host RAM one worker needs (offloaded activations, paged states)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reasons", dict(self.reasons))
        if self.device_map is not None:
            object.__setattr__(self, "device_map", dict(self.device_map))
        problems: list[str] = []
        _check_choice(problems, "quantization", self.quantization, QUANTIZATIONS)
        _check_choice(problems, "optimizer", self.optimizer, OPTIMIZERS)
        _check_choice(problems, "gradient_checkpointing", self.gradient_checkpointing, CHECKPOINTING)
        _check_choice(problems, "placement", self.placement, PLACEMENTS)
        _check_choice(problems, "backend", self.backend, BACKENDS)
        for name in ("nodes", "gpus_per_node", "micro_batch_size", "gradient_accumulation_steps",
                     "workers_per_node", "gpus_per_worker"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        _raise_if(problems, f"node plan {self.node_type}")

    @property
    def num_workers(self) -> int:
        return self.nodes * self.workers_per_node

    @property
    def samples_per_step(self) -> int:
        """Sequences one worker contributes to each optimizer step."""
        return self.micro_batch_size * self.gradient_accumulation_steps


@dataclass(frozen=True)
class WorkerAssignment:
    """Ray Train world rank -> the node type (and node index within it) it must run on."""

    rank: int
    node_type: str
    node_index: int  # 0..nodes-1 within its node type
    local_rank: int  # worker index within its node


@dataclass(frozen=True)
class TrainingPlan:
    model: str  # model id or path as given
    model_summary: Mapping[str, Any]  # name, architecture, parameter counts (for the manifest)
    job: JobSpec
    node_plans: tuple[NodePlan, ...]
    workers: tuple[WorkerAssignment, ...]
    warnings: tuple[str, ...] = ()
    version: int = PLAN_FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_plans", tuple(self.node_plans))
        object.__setattr__(self, "workers", tuple(self.workers))
        object.__setattr__(self, "warnings", tuple(self.warnings))
        object.__setattr__(self, "model_summary", dict(self.model_summary))
        problems: list[str] = []
        types = {p.node_type for p in self.node_plans}
        if len(types) != len(self.node_plans):
            problems.append("node types must be unique")
        ranks = [w.rank for w in self.workers]
        if ranks != list(range(len(ranks))):
            problems.append("worker ranks must be 0..N-1 in order")
        for w in self.workers:
            if w.node_type not in types:
                problems.append(f"worker {w.rank} names unknown node type {w.node_type!r}")
        _raise_if(problems, "plan")

    # -- derived values ------------------------------------------------------------------------
    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step over all workers (what the plan achieves)."""
        by_type = {p.node_type: p for p in self.node_plans}
        return sum(by_type[w.node_type].samples_per_step for w in self.workers)

    @property
    def tokens_per_second(self) -> float:
        """Predicted cluster throughput: the slowest worker paces every synchronous step."""
        if not self.workers:
            return 0.0
        by_type = {p.node_type: p for p in self.node_plans}
        step_s = max(by_type[w.node_type].samples_per_step * self.job.seq_len
                     / by_type[w.node_type].tokens_per_second for w in self.workers)
        return self.global_batch_size * self.job.seq_len / step_s

    def node_plan(self, node_type: str) -> NodePlan:
        for p in self.node_plans:
            if p.node_type == node_type:
                return p
        raise KeyError(node_type)

    def for_rank(self, rank: int) -> tuple[WorkerAssignment, NodePlan]:
        """The assignment and settings of one Ray Train world rank."""
        if not 0 <= rank < len(self.workers):
            raise PlanError(f"rank {rank} is not in this plan ({len(self.workers)} workers)")
        w = self.workers[rank]
        return w, self.node_plan(w.node_type)

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        nodes = []
        for p in self.node_plans:
            d = dataclasses.asdict(p)
            d["breakdown_bytes"] = d.pop("breakdown")
            d["num_workers"] = p.num_workers
            d["samples_per_step"] = p.samples_per_step
            nodes.append(d)
        return {
            **WRITTEN_BY,
            "version": self.version,
            "model": self.model,
            "model_summary": dict(self.model_summary),
            "job": dataclasses.asdict(self.job),
            "global_batch_size": self.global_batch_size,
            "num_workers": self.num_workers,
            "tokens_per_second": self.tokens_per_second,
            "node_plans": nodes,
            "workers": [dataclasses.asdict(w) for w in self.workers],
            "warnings": list(self.warnings),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainingPlan":
        version = data.get("version")
        if version != PLAN_FORMAT_VERSION:
            raise PlanError(f"plan format version {version!r} is not supported (expected "
                            f"{PLAN_FORMAT_VERSION}); re-run `rayquant plan` to regenerate it")
        node_fields = {f.name for f in dataclasses.fields(NodePlan)}
        node_plans = []
        for raw in data["node_plans"]:
            kw = {k: v for k, v in raw.items() if k in node_fields and k != "breakdown"}
            kw["breakdown"] = MemoryBreakdown(**raw["breakdown_bytes"])
            node_plans.append(NodePlan(**kw))
        job = dict(data["job"])
        job["lora_targets"] = tuple(job["lora_targets"])
        return cls(
            model=data["model"],
            model_summary=data.get("model_summary", {}),
            job=JobSpec(**job),
            node_plans=tuple(node_plans),
            workers=tuple(WorkerAssignment(**w) for w in data["workers"]),
            warnings=tuple(data.get("warnings", ())),
            version=version,
        )

    @classmethod
    def from_json(cls, text: str) -> "TrainingPlan":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str) -> "TrainingPlan":
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(f.read())
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist; write one with "
                            f"`rayquant plan ... --json -o {path}`") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PlanError(f"plan file {path} is not a rayquant plan ({e}); regenerate it with "
                            f"`rayquant plan ... --json -o {path}`") from None
