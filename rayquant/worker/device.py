"""This worker's device: checked against its NodePlan before any weights load, the device map it
loads with, and the peak memory it reached."""

from __future__ import annotations

import os
import resource
from typing import Any

from planner.hardware import CPU_DEVICE, GIB, lookup_gpu
from planner.plan import NodePlan
from rayquant.contract import DeviceInfo


class DeviceMismatchError(RuntimeError):
    """This worker's device is not what the plan was made for."""


def check_device(node_plan: NodePlan, rank: int) -> DeviceInfo:
    """The device this worker runs on, checked against its NodePlan; a mismatch raises."""
    import torch

    if node_plan.gpu == CPU_DEVICE:
        return DeviceInfo(device="cpu", name="CPU", cpus=os.cpu_count())
    if not torch.cuda.is_available():
        raise DeviceMismatchError(
            f"rank {rank} was planned for {node_plan.gpu} (node type {node_plan.node_type}) but sees no "
            f"CUDA GPU. To fix: re-plan for this cluster (plan: auto) or run on the planned nodes.")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    name, total = props.name, props.total_memory
    problems = []
    spec = lookup_gpu(node_plan.gpu)
    if name not in spec.nvml_names and abs(total - spec.memory_bytes) > 0.05 * spec.memory_bytes:
        problems.append(f"device is {name!r} with {total / GIB:.1f} GiB, the plan's {node_plan.gpu} "
                        f"is {'/'.join(spec.nvml_names)} with {spec.memory_bytes / GIB:.1f} GiB")
    if total < node_plan.peak_memory_bytes:
        problems.append(f"device {name!r} has {total / GIB:.1f} GiB but the plan needs "
                        f"{node_plan.peak_memory_bytes / GIB:.1f} GiB per worker")
    if problems:
        raise DeviceMismatchError(f"rank {rank} does not match its plan ({node_plan.node_type}): "
                                  + "; ".join(problems) + ". To fix: re-plan for this cluster (plan: auto).")
    return DeviceInfo(device=f"cuda:{torch.cuda.current_device()}", name=name, memory_bytes=total)


def device_map_for(node_plan: NodePlan) -> dict[str, Any]:
    """A dict device map (never a string under DDP): all on this worker's device, or the plan's
    layer map over the worker's GPUs for node-spanning placement."""
    import torch

    if node_plan.gpu == CPU_DEVICE or not torch.cuda.is_available():
        return {"": "cpu"}
    if node_plan.placement == "node-spanning" and node_plan.device_map:
        return {module: int(gpu) for module, gpu in node_plan.device_map.items()}
    return {"": torch.cuda.current_device()}


def peak_memory_bytes() -> tuple[int, str]:
    """Peak memory of this worker: CUDA max allocated on GPU, peak RSS of the process on CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (ru_maxrss)"
