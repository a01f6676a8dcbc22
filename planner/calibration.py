"""Calibration: measured peak memory and tokens/s on a real GPU, as factors on the planner's predictions.

`rayquant calibrate` (rayquant/calibrate.py) writes the file on a GPU machine; `make_plan(...,
calibration=Calibration.load(path))` scales its predictions for that GPU type and quantization by

* ``memory_factor(gpu, q)``: the largest measured/predicted ratio of allocator peak memory
  (``torch.cuda.max_memory_allocated`` over ``MemoryEstimate.allocated_bytes``) seen for that pair:
  plan for the worst case measured, since an out-of-memory error costs more than a smaller batch.
  ``calibrated_peak_bytes`` applies it to a predicted peak (the one rule the planner and
  ``rayquant estimate`` share);
* ``throughput_factor(gpu, q)``: the geometric mean of measured/predicted tokens per second.

Both are 1.0 where the file has no measurement (``Calibration(())`` is "no calibration"). Standard
library only (the planner's rule).

File format (JSON, ``"format": "rayquant-calibration"``, ``"version": 1``)::

    {"format": "rayquant-calibration", "version": 1, "created": "2026-...Z",
     "environment": {"torch": "2.11.0", "cuda": "13.0", "gpu_nvml_name": "NVIDIA H100 80GB HBM3"},
     "measurements": [{"gpu": "H100-80GB", "quantization": "nf4", "model": "meta-llama/Llama-3.2-1B",
        "seq_len": 2048, "micro_batch_size": 2, "gradient_checkpointing": "unsloth",
        "backend": "unsloth", "predicted_peak_bytes": ..., "predicted_allocated_bytes": ...,
        "measured_allocated_bytes": ..., "measured_reserved_bytes": ...,
        "predicted_tokens_per_second": ..., "measured_tokens_per_second": ...}, ...]}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from planner.plan import PlanError
from planner.vocab import QUANTIZATIONS

if TYPE_CHECKING:
    from planner.memory import MemoryEstimate

CALIBRATION_FORMAT = "rayquant-calibration"
CALIBRATION_VERSION = 1
# A measured/predicted ratio outside this range means a broken measurement (or a broken model),
# not something to plan with; validation refuses it rather than silently planning 10x off.
RATIO_RANGE = (0.1, 10.0)
# Throughput is wider: files recorded against the FLOPs-only model (before the host time per layer,
# issue 11) hold ratios down to 0.039 for small models (the 2026-11-27 H200 run; docs/planner.md).
THROUGHPUT_RATIO_RANGE = (0.01, 100.0)


class CalibrationError(PlanError):
    """A calibration file that cannot be used: says what is wrong and how to fix it."""


def calibrated_peak_bytes(estimate: "MemoryEstimate", memory_factor: float,
                          peak_bytes: int | None = None) -> int:
    """A predicted peak scaled by a calibration's memory factor.

    The factor compares allocated with allocated (measured max_memory_allocated over the predicted
    allocated bytes), so it scales what torch's allocator holds and leaves the CUDA context and the
    allocator slack as predicted. Rounded up: a plan never gains memory from rounding. `peak_bytes`
    is the peak to scale where it is not the estimate's own (a layer map's busiest GPU).
    """
    peak = estimate.peak_bytes if peak_bytes is None else peak_bytes
    outside = estimate.context_bytes + estimate.slack_bytes
    return outside + math.ceil((peak - outside) * memory_factor)


def gpu_key(name: str) -> str:
    """Normalise a GPU name for matching: case, spaces, dashes and an 'NVIDIA ' prefix do not matter."""
    name = re.sub(r"^nvidia\s+", "", name.strip().lower())
    return re.sub(r"[\s_\-]+", "", name)


@dataclass(frozen=True)
class Measurement:
    """One configuration measured on one GPU, next to what the planner predicted for it."""

    gpu: str  # catalog name, e.g. "H100-80GB" (or the NVML name where the catalog has none)
    quantization: str  # one of planner.plan.QUANTIZATIONS
    model: str
    seq_len: int
    micro_batch_size: int
    predicted_peak_bytes: int
    predicted_allocated_bytes: int  # the prediction without CUDA context / allocator slack
    measured_allocated_bytes: int  # torch.cuda.max_memory_allocated over the training steps
    measured_reserved_bytes: int  # torch.cuda.max_memory_reserved over the training steps
    predicted_tokens_per_second: float = 0.0  # 0: no prediction
    measured_tokens_per_second: float = 0.0  # 0: not measured
    gradient_checkpointing: str = "unsloth"
    backend: str = "unsloth"
    gpu_nvml_name: str = ""

    def problems(self) -> list[str]:
        out = []
        if self.quantization not in QUANTIZATIONS:
            out.append(f"quantization {self.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
        for name in ("seq_len", "micro_batch_size", "predicted_peak_bytes", "predicted_allocated_bytes",
                     "measured_allocated_bytes", "measured_reserved_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                out.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("predicted_tokens_per_second", "measured_tokens_per_second"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                out.append(f"{name} must be a number >= 0, got {v!r}")
        if not out:
            for what, ratio, bounds in (("memory", self.memory_ratio, RATIO_RANGE),
                                        ("throughput", self.throughput_ratio, THROUGHPUT_RATIO_RANGE)):
                if ratio is not None and not bounds[0] <= ratio <= bounds[1]:
                    out.append(f"measured/predicted {what} is {ratio:.3g}, outside {bounds}: "
                               "re-measure (or report a planner bug)")
        return out

    @property
    def memory_ratio(self) -> float:
        return self.measured_allocated_bytes / self.predicted_allocated_bytes

    @property
    def throughput_ratio(self) -> float | None:
        if self.predicted_tokens_per_second > 0 and self.measured_tokens_per_second > 0:
            return self.measured_tokens_per_second / self.predicted_tokens_per_second
        return None


@dataclass(frozen=True)
class Calibration:
    measurements: tuple[Measurement, ...]
    created: str = ""  # ISO 8601 UTC
    environment: Mapping[str, str] = field(default_factory=dict)  # versions, GPU, driver
    version: int = CALIBRATION_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "measurements", tuple(self.measurements))
        object.__setattr__(self, "environment", dict(self.environment))
        problems = [f"measurement {i} ({m.gpu}, {m.quantization}): {p}"
                    for i, m in enumerate(self.measurements) for p in m.problems()]
        if problems:
            raise CalibrationError("invalid calibration: " + "; ".join(problems))

    def _matching(self, gpu_name: str, quantization: str) -> list[Measurement]:
        key = gpu_key(gpu_name)
        return [m for m in self.measurements if m.quantization == quantization
                and key in (gpu_key(m.gpu), gpu_key(m.gpu_nvml_name or m.gpu))]

    def memory_factor(self, gpu_name: str, quantization: str) -> float:
        """Multiply predicted (allocated) memory by this for `gpu_name` and `quantization`."""
        ratios = [m.memory_ratio for m in self._matching(gpu_name, quantization)]
        return max(ratios) if ratios else 1.0

    def throughput_factor(self, gpu_name: str, quantization: str) -> float:
        """Multiply predicted tokens/s by this for `gpu_name` and `quantization`."""
        ratios = [r for m in self._matching(gpu_name, quantization)
                  if (r := m.throughput_ratio) is not None]
        return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else 1.0

    def gpus(self) -> tuple[str, ...]:
        return tuple(sorted({m.gpu for m in self.measurements}))

    def merged(self, other: "Calibration") -> "Calibration":
        """Both files' measurements (e.g. one file per GPU type, from one Ray task each)."""
        return dataclasses.replace(self, measurements=self.measurements + other.measurements,
                                   environment={**other.environment, **self.environment})

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": CALIBRATION_FORMAT, "version": self.version, "created": self.created,
                "environment": dict(self.environment),
                "measurements": [dataclasses.asdict(m) for m in self.measurements],
                "factors": [{"gpu": g, "quantization": q,
                             "memory_factor": self.memory_factor(g, q),
                             "throughput_factor": self.throughput_factor(g, q)}
                            for g, q in sorted({(m.gpu, m.quantization) for m in self.measurements})]}

    @classmethod
    def from_dict(cls, data: Any, where: str = "calibration") -> "Calibration":
        fix = "To fix: regenerate it with `rayquant calibrate --model M -o FILE` on a GPU machine."
        if not isinstance(data, Mapping) or data.get("format") != CALIBRATION_FORMAT:
            raise CalibrationError(f"{where} is not a rayquant calibration file (no "
                                   f"\"format\": \"{CALIBRATION_FORMAT}\"). {fix}")
        if data.get("version") != CALIBRATION_VERSION:
            raise CalibrationError(f"{where} has calibration format version {data.get('version')!r}; "
                                   f"this rayquant reads version {CALIBRATION_VERSION}. {fix}")
        raw = data.get("measurements")
        if not isinstance(raw, list):
            raise CalibrationError(f"{where}: \"measurements\" must be a list. {fix}")
        known = {f.name for f in dataclasses.fields(Measurement)}
        required = {f.name for f in dataclasses.fields(Measurement)
                    if f.default is dataclasses.MISSING}
        problems, measurements = [], []
        for i, row in enumerate(raw):
            if not isinstance(row, Mapping):
                problems.append(f"measurement {i} is not an object")
                continue
            missing = sorted(required - set(row))
            unknown = sorted(set(row) - known)
            if missing:
                problems.append(f"measurement {i} lacks {', '.join(missing)}")
            if unknown:
                problems.append(f"measurement {i} has unknown fields {', '.join(unknown)}")
            if not missing and not unknown:
                measurements.append(Measurement(**row))
        if problems:
            raise CalibrationError(f"{where}: " + "; ".join(problems) + f". {fix}")
        try:
            return cls(measurements=tuple(measurements), created=str(data.get("created", "")),
                       environment=dict(data.get("environment") or {}))
        except CalibrationError as e:
            raise CalibrationError(f"{where}: {e}. {fix}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (a temporary file in the same directory, then rename)."""
        from planner.atomic import write_atomically

        write_atomically(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise CalibrationError(f"calibration file {path} does not exist. To fix: write one with "
                                   f"`rayquant calibrate --model M -o {path}` on a GPU machine") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"calibration file {path} is not valid JSON ({e}). To fix: "
                                   "regenerate it with `rayquant calibrate`") from None
        return cls.from_dict(data, where=f"calibration file {path}")
