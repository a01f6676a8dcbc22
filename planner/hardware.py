"""GPUs and node types: GpuSpec (one GPU's figures, built from the rows of planner.catalog_gpus),
lookups by name, the CPU pseudo-device, the FP8 path a GPU takes, and inventory specs.

    lookup_gpu("H100-80GB"), lookup_gpu("NVIDIA A10G"), lookup_gpu("24GiB")
    parse_gpu_spec("2x8xH100-80GB,4x1xA10G")   # nodes x GPUs per node x GPU
    node_types_from_dicts([{"gpu": "A10G", "gpus_per_node": 1, "count": 4}])
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from planner.catalog_gpus import (AMBIGUOUS_GPU_NAMES, CPU_ROW, DEFAULT_LINK, GENERIC_GPU, GPU_ALIASES, GPU_LINKS,
                                  GPU_ROWS)
from planner.host import host_memory_bytes
from planner.plan import PlanError

GIB = 1024**3
MIB = 1024**2
# The catalog name of the CPU pseudo-device (CPU-only Ray clusters): what NodePlan.gpu holds for
# CPU workers and what `--gpus 2x1xCPU` names.
CPU_DEVICE: str = CPU_ROW["name"]


class UnknownGpuError(PlanError):
    """A GPU name that is not in the catalog (the message names the closest ones)."""


class AmbiguousGpuError(PlanError):
    """A GPU name that fits several catalog GPUs ("A100": 40 or 80 GB); the message names them."""


@dataclass(frozen=True)
class GpuSpec:
    name: str  # catalog name, e.g. "H100-80GB", "A10G", "RTX-4090"
    nvml_names: tuple[str, ...]  # what NVML / nvidia-smi report, e.g. ("NVIDIA H100 80GB HBM3",)
    memory_bytes: int  # total device memory as NVML reports it
    compute_capability: tuple[int, int]
    bf16_tflops: float  # dense, tensor cores (0 where bf16 is unsupported)
    fp16_tflops: float  # dense, tensor cores
    fp8_tflops: float | None  # dense; None where there are no FP8 tensor cores
    bandwidth_gb_per_s: float
    source: str
    generic: bool = False  # a GPU known only by its memory size ("24GiB"): figures are assumed
    host_link_gb_per_s: float = DEFAULT_LINK[0]  # GPU <-> host RAM, per direction
    nvlink_gb_per_s: float | None = None  # GPU <-> GPU in a node, per direction; None: over PCIe

    def __post_init__(self) -> None:
        object.__setattr__(self, "nvml_names", tuple(self.nvml_names))
        object.__setattr__(self, "compute_capability", tuple(self.compute_capability))
        if self.memory_bytes <= 0:
            raise PlanError(f"GPU {self.name}: memory_bytes must be > 0, got {self.memory_bytes}")

    @property
    def supports_bf16(self) -> bool:
        return self.compute_capability >= (8, 0)

    @property
    def supports_fp8(self) -> bool:
        """FP8 tensor cores: some FP8 path (fp8_path_for) runs here."""
        return fp8_path_for(self.compute_capability) is not None

    @property
    def is_cpu(self) -> bool:
        """The CPU pseudo-device (compute capability (0, 0)): same formulas against host memory."""
        return self.compute_capability == CPU_ROW["cc"]

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB

    @property
    def compute_capability_str(self) -> str:
        return "%d.%d" % self.compute_capability

    @property
    def tflops_16bit(self) -> float:
        """Dense tensor-core TFLOPS in the 16-bit dtype this GPU trains in (bf16, else fp16)."""
        return self.bf16_tflops if self.supports_bf16 and self.bf16_tflops else self.fp16_tflops


@dataclass(frozen=True)
class NodeType:
    """A group of identical nodes: `count` nodes with `gpus_per_node` GPUs of one kind each."""

    gpu: GpuSpec
    gpus_per_node: int
    count: int
    host_memory_bytes: int = 0  # 0: unknown
    cpus_per_node: int = 0  # 0: unknown
    node_ids: tuple[str, ...] = ()  # Ray node ids when read from a live cluster

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_ids", tuple(self.node_ids))
        problems = [f"{f} must be >= 1, got {getattr(self, f)}" for f in ("gpus_per_node", "count")
                    if getattr(self, f) < 1]
        problems += [f"{f} must be >= 0, got {getattr(self, f)}"
                     for f in ("host_memory_bytes", "cpus_per_node") if getattr(self, f) < 0]
        if problems:
            raise PlanError(f"node type {self.gpu.name}: " + "; ".join(problems))

    @property
    def key(self) -> str:
        return f"{self.gpu.name}:{self.gpus_per_node}"

    @property
    def num_gpus(self) -> int:
        return self.gpus_per_node * self.count


def _row_to_spec(row: Mapping[str, Any], memory_bytes: int | None = None, **changes: Any) -> GpuSpec:
    return GpuSpec(
        name=changes.get("name", row.get("name")),
        nvml_names=tuple(changes.get("nvml", row.get("nvml", ()))),
        memory_bytes=memory_bytes if memory_bytes is not None else row["mib"] * MIB,
        compute_capability=row["cc"], bf16_tflops=row["bf16"], fp16_tflops=row["fp16"],
        fp8_tflops=row["fp8"], bandwidth_gb_per_s=row["bw"], source=row["source"],
        generic=changes.get("generic", False),
        host_link_gb_per_s=GPU_LINKS.get(row.get("name"), DEFAULT_LINK)[0],
        nvlink_gb_per_s=GPU_LINKS.get(row.get("name"), DEFAULT_LINK)[1],
    )


GPU_CATALOG: tuple[GpuSpec, ...] = tuple(_row_to_spec(r) for r in GPU_ROWS)


def cpu_device(memory_bytes: int | None = None) -> GpuSpec:
    """The CPU pseudo-device for CPU-only Ray clusters; its memory is host RAM (this process's,
    container limit included, when `memory_bytes` is not given)."""
    mem = host_memory_bytes() if memory_bytes is None else int(memory_bytes)
    return _row_to_spec(CPU_ROW, memory_bytes=mem, nvml=())


def fp8_path_for(compute_capability: tuple[int, int]) -> str | None:
    """The FP8 path a GPU of this compute capability takes, or None (no FP8 tensor cores, the CPU).

    "unsloth" from cc 9.0: Unsloth's load_in_fp8, whose own gate is
    `torch.cuda.get_device_capability() >= (9, 0)` (unsloth/models/loader_utils.py). "rowwise" on
    cc 8.9 (Ada: L4, L40S, RTX 4090): FP8 tensor cores exist but Unsloth refuses on-the-fly FP8
    there, so rayquant's row-scaled FP8 linear (rayquant/fp8.py) runs instead. The planner records
    the answer in NodePlan.fp8_path (the loader follows that); calibration and supports_fp8 ask here.
    """
    cc = tuple(compute_capability)
    if cc >= (9, 0):
        return "unsloth"
    if cc == (8, 9):
        return "rowwise"
    return None


def _key(text: str) -> str:
    """Normalize a GPU name: case, '-', '_' and spaces do not matter; vendor words are dropped."""
    k = re.sub(r"[^a-z0-9]", "", text.lower())
    for prefix in ("nvidia", "geforce", "tesla"):
        k = k.removeprefix(prefix)
    return k


def _build_index() -> dict[str, GpuSpec]:
    index: dict[str, GpuSpec] = {}
    by_name = {g.name: g for g in GPU_CATALOG}
    for g in GPU_CATALOG:
        for n in (*g.nvml_names, g.name):  # catalog names win over NVML names on a clash
            index[_key(n)] = g
    for alias, target in GPU_ALIASES.items():
        index.setdefault(_key(alias), by_name[target])
    return index


_INDEX = _build_index()
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|g)\s*$", re.IGNORECASE)


def generic_gpu(memory_gib: float) -> GpuSpec:
    """A GPU known only by its memory: conservative assumed figures (see GENERIC_GPU's source)."""
    if memory_gib <= 0:
        raise PlanError(f"GPU memory must be > 0, got {memory_gib} GiB")
    label = f"{memory_gib:g}"
    return _row_to_spec(GENERIC_GPU, memory_bytes=int(memory_gib * GIB), name=f"GPU-{label}GiB",
                        nvml=(), generic=True)


_AMBIGUOUS = {_key(name): choices for name, choices in AMBIGUOUS_GPU_NAMES.items()}


def _resolve_ambiguous(raw: str, choices: tuple[str, ...], memory_bytes: int) -> GpuSpec:
    """One of `choices` for an ambiguous name: the variant whose memory is nearest the GPU's real
    memory (NVML), the slower one where variants share that memory; refused without the memory."""
    by_name = {g.name: g for g in GPU_CATALOG}
    variants = [by_name[c] for c in choices]
    if memory_bytes > 0:
        nearest = min(abs(g.memory_bytes - memory_bytes) for g in variants)
        close = [g for g in variants if abs(g.memory_bytes - memory_bytes) == nearest]
        if nearest <= 0.1 * memory_bytes:
            return min(close, key=lambda g: (g.bf16_tflops or g.fp16_tflops, g.name))
    listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
    sizes = ", ".join(f"{c} {by_name[c].memory_bytes / GIB:.0f} GiB" for c in choices)
    raise AmbiguousGpuError(f"GPU name {raw!r} fits several GPUs ({sizes}) and the plan depends on "
                            f"which. To fix: write {listed}.")


def lookup_gpu(text: str, memory_bytes: int = 0) -> GpuSpec:
    """A GPU by catalog name, NVML name, alias, `CPU`, or a bare size (`24GiB`, `80GB`, `48G`).

    A bare size means a generic GPU of that memory (GB is read as GiB, as GPU vendors use it).
    A name that fits several catalog GPUs (AMBIGUOUS_GPU_NAMES: "A100", "V100", "H100", "A6000")
    is refused with the choices (AmbiguousGpuError) unless `memory_bytes`, the GPU's real memory
    from NVML, picks one.
    """
    raw = str(text).strip()
    if not raw:
        raise UnknownGpuError("empty GPU name. To fix: pass a catalog name such as H100-80GB or "
                              "A10G, or a memory size such as 24GiB (`rayquant gpus` lists names).")
    m = _SIZE.match(raw)
    if m:
        return generic_gpu(float(m.group(1)))
    k = _key(raw)
    if k == _key(CPU_DEVICE):
        return cpu_device()
    if k in _INDEX:
        return _INDEX[k]
    if k in _AMBIGUOUS:
        return _resolve_ambiguous(raw, _AMBIGUOUS[k], memory_bytes)
    # The names generic GPUs carry ("GPU-24GiB") read back as the same generic GPU.
    generic = re.fullmatch(r"gpu[-_ ]?(\d+(?:\.\d+)?)\s*(gib|gb|g)", raw, re.IGNORECASE)
    if generic:
        return generic_gpu(float(generic.group(1)))
    names = [g.name for g in GPU_CATALOG] + [CPU_DEVICE]
    keys = {_key(n): n for n in names}
    close = [keys[c] for c in difflib.get_close_matches(k, list(keys), n=3, cutoff=0.0)]
    raise UnknownGpuError(f"unknown GPU {raw!r}. Closest catalog names: {', '.join(close)}. "
                          "To fix: use a catalog name (`rayquant gpus` lists them) or a memory "
                          "size such as 24GiB for a GPU not in the catalog.")


_SPEC_PART = re.compile(r"^\s*(?:(\d+)\s*[x*]\s*)?(?:(\d+)\s*[x*]\s*)?(\S.*?)\s*$", re.IGNORECASE)
_SPEC_HELP = ("expected NODESxGPUSxGPU entries separated by commas, e.g. "
              "\"2x8xH100-80GB,4x1xA10G\" (also \"8xH100-80GB\" for one node, \"A10G\" for one GPU)")


def _smaller_known(a: int, b: int) -> int:
    """The smaller of two sizes where 0 means unknown (a merged group is only as big as its least)."""
    return min(a, b) if a and b else a or b


def _merge(node_types: Iterable[NodeType]) -> tuple[NodeType, ...]:
    """Merge node types with the same GPU and GPUs per node (counts add; first seen wins order)."""
    merged: dict[str, NodeType] = {}
    for nt in node_types:
        prev = merged.get(nt.key)
        if prev is None:
            merged[nt.key] = nt
        else:
            merged[nt.key] = NodeType(
                gpu=prev.gpu, gpus_per_node=prev.gpus_per_node, count=prev.count + nt.count,
                host_memory_bytes=_smaller_known(prev.host_memory_bytes, nt.host_memory_bytes),
                cpus_per_node=_smaller_known(prev.cpus_per_node, nt.cpus_per_node),
                node_ids=prev.node_ids + nt.node_ids)
    return tuple(merged.values())


def parse_gpu_spec(spec: str) -> tuple[NodeType, ...]:
    """Parse "2x8xH100-80GB,4x1xA10G" (nodes x GPUs per node x GPU) into node types."""
    if not str(spec).strip():
        raise PlanError(f"empty GPU spec: {_SPEC_HELP}")
    parts = str(spec).split(",")
    if any(not p.strip() for p in parts):
        raise PlanError(f"GPU spec {spec!r} has an empty entry: {_SPEC_HELP}")
    out = []
    for part in parts:
        m = _SPEC_PART.match(part)
        # A GPU name never starts with "<digits>x" and is never only digits: such a leftover
        # means too many or too few "x"-separated fields.
        if not m or re.match(r"^\d+\s*([x*]|$)", m.group(3), re.IGNORECASE):
            raise PlanError(f"cannot read {part.strip()!r} in GPU spec {spec!r}: {_SPEC_HELP}")
        a, b, gpu_text = m.group(1), m.group(2), m.group(3)
        nodes, per_node = (int(a), int(b)) if b is not None else (1, int(a) if a else 1)
        if nodes < 1 or per_node < 1:
            raise PlanError(f"{part.strip()!r} in GPU spec {spec!r} asks for zero nodes or GPUs: "
                            f"{_SPEC_HELP}")
        out.append(NodeType(gpu=lookup_gpu(gpu_text), gpus_per_node=per_node, count=nodes))
    return _merge(out)


_ROW_FIELDS = ("gpu", "gpus_per_node", "count", "host_memory_gib", "cpus", "node_ids")


def node_types_from_dicts(rows: Iterable[Mapping[str, Any]]) -> tuple[NodeType, ...]:
    """Node types from inventory rows (JSON/YAML parsed by the caller), all problems reported at once.

    Row: {"gpu": "A10G", "gpus_per_node": 1, "count": 4, "host_memory_gib": 64, "cpus": 16};
    only `gpu` is required (gpus_per_node and count default to 1). `gpu: CPU` takes its memory from
    host_memory_gib.
    """
    if isinstance(rows, Mapping):
        rows = rows.get("nodes", rows.get("node_types", [rows]))  # {"nodes": [...]} or one row
    problems: list[str] = []
    out: list[NodeType] = []
    rows = list(rows) if not isinstance(rows, (str, bytes)) else None
    if not rows:
        raise PlanError("the inventory has no node rows. To fix: give a list of rows like "
                        "{\"gpu\": \"A10G\", \"gpus_per_node\": 1, \"count\": 4}")
    for i, row in enumerate(rows, 1):
        where = f"inventory row {i}"
        if not isinstance(row, Mapping):
            problems.append(f"{where}: expected a mapping like {{\"gpu\": \"A10G\", \"count\": 4}}, "
                            f"got {row!r}")
            continue
        unknown = sorted(set(row) - set(_ROW_FIELDS))
        if unknown:
            problems.append(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: "
                            f"{', '.join(_ROW_FIELDS)})")

        def number(field: str, default: float, minimum: float, integer: bool = True) -> float:
            v = row.get(field, default)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok or v < minimum:
                kind = "an integer" if integer else "a number"
                problems.append(f"{where}: field '{field}' must be {kind} >= {minimum}, got {v!r}")
                return default
            return v

        per_node = int(number("gpus_per_node", 1, 1))
        count = int(number("count", 1, 1))
        host_gib = number("host_memory_gib", 0, 0, integer=False)
        cpus = int(number("cpus", 0, 0))
        ids = row.get("node_ids", ())
        if not isinstance(ids, (list, tuple)) or not all(isinstance(x, str) for x in ids):
            problems.append(f"{where}: field 'node_ids' must be a list of strings, got {ids!r}")
            ids = ()
        gpu_text = row.get("gpu")
        if not isinstance(gpu_text, str) or not gpu_text.strip():
            problems.append(f"{where}: field 'gpu' is missing or empty (e.g. \"gpu\": \"A10G\")")
            continue
        host_bytes = int(host_gib * GIB)
        try:
            gpu = (cpu_device(host_bytes or None) if _key(gpu_text) == _key(CPU_DEVICE)
                   else lookup_gpu(gpu_text))
        except PlanError as e:
            problems.append(f"{where}: field 'gpu': {e}")
            continue
        out.append(NodeType(gpu=gpu, gpus_per_node=per_node, count=count,
                            host_memory_bytes=host_bytes, cpus_per_node=cpus, node_ids=tuple(ids)))
    if problems:
        raise PlanError("invalid inventory: " + "; ".join(problems))
    return _merge(out)
