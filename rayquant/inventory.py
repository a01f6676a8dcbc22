"""What hardware a cluster has: node types read from a live Ray cluster, local NVML, or a file.

Three sources, one result (a tuple of `planner.hardware.NodeType`, nodes with the same GPU and GPU
count grouped into one type, keeping their Ray node ids):

- `discover_node_types(address)`: one small probe task pinned to each alive Ray node reads NVML
  (GPU name, memory, compute capability, count, driver) and the host's RAM and CPUs. Where NVML is
  absent or the probe cannot run, the node is described from what Ray advertises: its `GPU` count, its
  `accelerator_type:*` resource and its `ray.io/accelerator-type` label.
- `local_node_types()`: this machine alone, from NVML.
- `load_inventory_file(path)`: YAML or JSON, for planning offline.

Ray and yaml are imported inside the functions that need them, so importing this module is cheap.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from planner.host import host_memory_bytes
from planner.plan import PlanError

RAY_ACCELERATOR_LABEL = "ray.io/accelerator-type"  # set by Ray on nodes with a detected GPU
RAY_ACCELERATOR_RESOURCE_PREFIX = "accelerator_type:"
PROBE_TIMEOUT_S = 60.0

# Ray's accelerator types (ray.util.accelerators) that name a GPU family rather than one catalog
# row. Without NVML we cannot read the memory, so we take the smallest variant: a plan made for less
# memory still fits the larger card. Source: ray/util/accelerators/accelerators.py (Ray 2.60).
_RAY_TYPE_TO_CATALOG = {
    "A100": "A100-40GB",
    "A100-40G": "A100-40GB",
    "A100-80G": "A100-80GB",
    "H100": "H100-80GB",
    "V100": "V100-16GB",
}


class InventoryError(PlanError):
    """The cluster's hardware could not be read: the message says why and how to fix it."""


@dataclass(frozen=True)
class NodeProbe:
    """What one node reported (or what Ray advertises for it when it could not report)."""

    node_id: str
    gpu_names: tuple[str, ...]  # one per GPU: NVML names, or Ray's accelerator type
    gpu_memory_bytes: tuple[int, ...]  # one per GPU; 0 where unknown (no NVML)
    compute_capabilities: tuple[tuple[int, int], ...]  # one per GPU; empty where unknown
    driver_version: str | None
    host_memory_bytes: int
    cpus: int
    source: str  # "nvml" | "ray-resources"
    labels: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def gpu_count(self) -> int:
        return len(self.gpu_names)


# -- reading one machine -----------------------------------------------------------------------
def host_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def read_nvml() -> dict[str, Any]:
    """GPUs of this machine through nvidia-ml-py: {"gpus": [...], "driver": str} or {"error": str}."""
    try:
        import pynvml
    except ImportError:
        return {"error": "nvidia-ml-py is not installed (pip install nvidia-ml-py)"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:  # no driver: a CPU-only machine
        return {"error": f"NVML unavailable ({e})"}
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        # The probe task reserves no GPU; NVML sees every GPU of the node regardless.
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append({
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                "compute_capability": [int(major), int(minor)],
            })
        return {"gpus": gpus, "driver": driver.decode() if isinstance(driver, bytes) else driver}
    except pynvml.NVMLError as e:
        return {"error": f"NVML query failed ({e})"}
    finally:
        pynvml.nvmlShutdown()


def probe_this_machine() -> dict[str, Any]:
    """Everything the planner needs from one machine, as plain data (it travels back from Ray)."""
    return {"nvml": read_nvml(), "host_memory_bytes": host_memory_bytes(), "cpus": host_cpus()}


def _probe_from_report(node_id: str, report: Mapping[str, Any], labels: Mapping[str, str],
                       ray_gpus: int | None, ray_type: str | None) -> NodeProbe:
    """`ray_gpus`: the GPUs Ray lets workers reserve on the node (None: no Ray, all of NVML's)."""
    nvml = report["nvml"]
    gpus = nvml.get("gpus") or []
    notes = []
    if ray_gpus is not None and len(gpus) > ray_gpus:
        # `ray start --num-gpus` may hand Ray fewer GPUs than the machine has; workers get only those.
        notes.append(f"NVML sees {len(gpus)} GPUs, Ray offers {ray_gpus}; planning {ray_gpus}")
        gpus = gpus[:ray_gpus]
    if gpus:
        return NodeProbe(
            node_id=node_id,
            gpu_names=tuple(g["name"] for g in gpus),
            gpu_memory_bytes=tuple(g["memory_bytes"] for g in gpus),
            compute_capabilities=tuple(tuple(g["compute_capability"]) for g in gpus),
            driver_version=nvml.get("driver"),
            host_memory_bytes=report["host_memory_bytes"], cpus=report["cpus"],
            source="nvml", labels=dict(labels), notes=tuple(notes))
    ray_gpus = ray_gpus or 0
    if ray_gpus and ray_type is None:
        notes.append(f"node advertises {ray_gpus} GPU(s) but no accelerator type and NVML says: "
                     f"{nvml.get('error', 'no GPUs')}")
    return NodeProbe(
        node_id=node_id, gpu_names=(ray_type,) * ray_gpus if ray_type else (),
        gpu_memory_bytes=(0,) * ray_gpus if ray_type else (), compute_capabilities=(),
        driver_version=None, host_memory_bytes=report["host_memory_bytes"], cpus=report["cpus"],
        source="ray-resources", labels=dict(labels), notes=tuple(notes))


# -- grouping ----------------------------------------------------------------------------------
def _gpu_spec(name: str, memory_bytes: int):
    """The catalog row for a GPU named by NVML or Ray; a generic GPU of its memory if unknown."""
    from planner import hardware

    # NVML names are exact; a Ray accelerator type with unknown memory takes its smallest variant.
    candidates = [name] if memory_bytes else [_RAY_TYPE_TO_CATALOG.get(name, name), name]
    for candidate in candidates:
        try:
            return hardware.lookup_gpu(candidate, memory_bytes), None
        except PlanError:  # not a catalog name: try the next, or a generic GPU of its memory
            continue
    if memory_bytes:
        size = f"{memory_bytes // hardware.GIB}GiB"
        return hardware.lookup_gpu(size), (f"GPU {name!r} is not in the catalog; planning it as a "
                                            f"generic {size} GPU")
    raise InventoryError(
        f"GPU {name!r} is not in rayquant's catalog and its memory is unknown (no NVML on that node).\n"
        f"To fix: install nvidia-ml-py on the node, or describe it in an inventory file "
        f"(`rayquant plan --inventory FILE`) with a catalog GPU from `rayquant gpus`.")


def node_types_from_probes(probes: Sequence[NodeProbe], include_cpu_nodes: bool | None = None):
    """Group probed nodes into node types (same GPU and GPU count); keeps node ids in order.

    `include_cpu_nodes`: None includes CPU-only nodes only when no node has a GPU (a GPU cluster's
    CPU head should not get training workers); True or False forces it. A CPU-only node becomes the
    CPU pseudo-device with its host RAM and one worker slot per CPU (`CPU:<cpus>`). Nodes with no CPU for Ray
    (a KubeRay head started with num-cpus 0) are left out: they cannot host a worker.
    """
    from planner import hardware

    has_gpu_nodes = any(p.gpu_count for p in probes)
    if include_cpu_nodes is None:
        include_cpu_nodes = not has_gpu_nodes
    groups: dict[str, list[tuple[NodeProbe, Any]]] = {}
    for probe in probes:
        if probe.cpus < 1:
            continue
        if probe.gpu_count:
            # A node with mixed GPUs is planned as its smallest GPU times its GPU count.
            idx = min(range(probe.gpu_count), key=lambda i: probe.gpu_memory_bytes[i])
            spec, _ = _gpu_spec(probe.gpu_names[idx], probe.gpu_memory_bytes[idx])
            key = f"{spec.name}:{probe.gpu_count}"
        elif include_cpu_nodes:
            # The CPU pseudo-device offers one worker slot per CPU Ray gives the node (the trainer's
            # convention for a local CPU machine too), so CPU nodes differ by their CPU count.
            spec = hardware.cpu_device(probe.host_memory_bytes)
            key = f"{spec.name}:{probe.cpus}"
        else:
            continue
        groups.setdefault(key, []).append((probe, spec))
    node_types = []
    for members in groups.values():
        probes_in = [p for p, _ in members]
        # Identical hardware can report slightly different free RAM; plan for the smallest.
        host_memory = min(p.host_memory_bytes for p in probes_in)
        spec = members[0][1]
        if not probes_in[0].gpu_count:
            spec = hardware.cpu_device(host_memory)
        node_types.append(hardware.NodeType(
            gpu=spec, gpus_per_node=probes_in[0].gpu_count or probes_in[0].cpus, count=len(probes_in),
            host_memory_bytes=host_memory, cpus_per_node=min(p.cpus for p in probes_in),
            node_ids=tuple(p.node_id for p in probes_in)))
    return tuple(node_types)


def probe_notes(probes: Iterable[NodeProbe]) -> list[str]:
    """How nodes were read (fallbacks, generic GPUs), one line per distinct note with its nodes."""
    by_note: dict[str, list[str]] = {}
    for p in probes:
        notes = list(p.notes)
        for name, mem in zip(p.gpu_names, p.gpu_memory_bytes):
            _, note = _gpu_spec(name, mem)
            if note:
                notes.append(note)
                break
        if p.source == "ray-resources" and p.gpu_count:
            notes.append("read from Ray's resources and labels (no NVML on the node)")
        for note in notes:
            by_note.setdefault(note, []).append(p.node_id[:12])
    lines = []
    for note, nodes in by_note.items():
        shown = ", ".join(nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
        lines.append(f"{note} ({len(nodes)} node{'s' * (len(nodes) != 1)}: {shown})")
    return lines


# -- live Ray cluster --------------------------------------------------------------------------
def probe_cluster(address: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> list[NodeProbe]:
    """Probe every alive node of the Ray cluster at `address` (None: the connected one, else
    RAY_ADDRESS, else a new local cluster: rayquant.cluster.connect). A connection this opens is
    closed after."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rayquant.cluster import connected

    with connected(address, driver_logs=False):
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        probe = ray.remote(num_cpus=0, max_retries=0)(probe_this_machine)
        refs = {n["NodeID"]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        ready_set = set(ready)
        probes = []
        for n in nodes:
            resources, labels = n.get("Resources", {}), n.get("Labels", {}) or {}
            ray_type = labels.get(RAY_ACCELERATOR_LABEL) or next(
                (k[len(RAY_ACCELERATOR_RESOURCE_PREFIX):] for k in resources
                 if k.startswith(RAY_ACCELERATOR_RESOURCE_PREFIX)), None)
            fallback = {"nvml": {"error": "the probe task did not finish"},
                        "host_memory_bytes": int(resources.get("memory", 0)),
                        "cpus": int(resources.get("CPU", 0))}
            report, ref = fallback, refs[n["NodeID"]]
            if ref in ready_set:
                try:
                    report = ray.get(ref)
                except ray.exceptions.RayError as e:  # rayquant missing on that node, say
                    fallback["nvml"] = {"error": f"the probe task failed: {type(e).__name__}"}
            # Ray's CPU count is what workers can reserve (absent: `--num-cpus 0`, none at all).
            report = dict(report, cpus=int(resources.get("CPU", 0)))
            probes.append(_probe_from_report(n["NodeID"], report, labels,
                                             int(resources.get("GPU", 0)), ray_type))
        return probes


def discover_node_types(address: str | None = None, include_cpu_nodes: bool | None = None):
    """Node types of a live Ray cluster (see `probe_cluster` for which one)."""
    return node_types_from_probes(probe_cluster(address), include_cpu_nodes)


def probe_local() -> NodeProbe:
    """This machine, read through NVML alone (no Ray)."""
    return _probe_from_report("local", probe_this_machine(), {}, None, None)


def local_node_types():
    """This machine as one node type, from NVML alone (the CPU pseudo-device without a GPU)."""
    import dataclasses

    types = node_types_from_probes([probe_local()], include_cpu_nodes=True)
    # Not a Ray node: no node id that placement could pin to.
    return tuple(dataclasses.replace(nt, node_ids=()) for nt in types)


# -- files -------------------------------------------------------------------------------------
def load_inventory_file(path: str):
    """Node types from a YAML or JSON file: a list (or {"nodes": [...]}) of rows like
    `{gpu: H100-80GB, gpus_per_node: 8, count: 2, host_memory_gib: 1024, cpus: 96}` (the rows
    `rayquant inventory --json` prints; see planner.hardware.node_types_from_dicts)."""
    from planner import hardware

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise InventoryError(f"cannot read inventory file {path}: {e.strerror}. To fix: pass an existing "
                             "JSON or YAML file with rows like {\"gpu\": \"A10G\", \"count\": 4}") from None
    is_yaml = str(path).endswith((".yaml", ".yml"))
    if is_yaml:
        import yaml

        from rayquant import yamlio

        parse, malformed = yamlio.safe_load, yaml.YAMLError
    else:
        parse, malformed = json.loads, json.JSONDecodeError
    try:
        data = parse(text)
    except malformed as e:
        raise InventoryError(f"inventory file {path} is not valid {'YAML' if is_yaml else 'JSON'} ({e}). "
                             "To fix: write a list of rows like [{\"gpu\": \"A10G\", \"gpus_per_node\": 1, "
                             "\"count\": 4}]") from None
    entries = data.get("nodes") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise InventoryError(
            f"inventory file {path} must hold a list of node entries (or {{nodes: [...]}}), e.g.\n"
            f"  nodes:\n    - {{gpu: H100-80GB, gpus_per_node: 8, count: 2}}")
    try:
        return tuple(hardware.node_types_from_dicts(entries))
    except PlanError as e:  # every bad row, listed: say which file they are in
        raise InventoryError(f"inventory file {path}: {e.template}") from None


def node_types_to_dicts(node_types) -> list[dict[str, Any]]:
    """Node types as inventory rows that `load_inventory_file` reads back (for --json and files)."""
    from planner.hardware import GIB

    return [{"gpu": nt.gpu.name, "gpus_per_node": nt.gpus_per_node, "count": nt.count,
             "host_memory_gib": nt.host_memory_bytes / GIB, "cpus": nt.cpus_per_node,
             "node_ids": list(nt.node_ids)} for nt in node_types]
