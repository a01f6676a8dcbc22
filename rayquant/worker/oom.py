"""An out-of-memory error in a worker, turned into what the driver needs to re-plan.

torch raises torch.OutOfMemoryError (CUDA's allocator; a subclass of RuntimeError) anywhere: while
loading, in forward, backward or the optimizer step. The worker does not try to continue: the
caching allocator is not trusted after an OOM, so the driver restarts the workers as fresh
processes with a cheaper plan (rayquant.trainer, planner.replan). Here the error is recognised, and
replaced by contract.WorkerOutOfMemory carrying the memory this worker saw.
"""

from __future__ import annotations

from rayquant.contract import OutOfMemoryReport, WorkerOutOfMemory

# What a CUDA out-of-memory error says where torch raises it as a plain RuntimeError (inside a kernel
# launch or a library call rather than the caching allocator).
_MESSAGES = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")

# The optimizer steps this rank has done, kept by the progress callback (rayquant.worker.callbacks).
reached = {"step": None}


def is_out_of_memory(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, is torch's out-of-memory error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, WorkerOutOfMemory):
            return True
        if any(c.__name__ == "OutOfMemoryError" and c.__module__.startswith("torch") for c in type(exc).__mro__):
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc) for m in _MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def report(exc: BaseException, rank: int, node_type: str) -> WorkerOutOfMemory:
    """The WorkerOutOfMemory to raise from `exc` (an out-of-memory error) on this rank."""
    import torch

    from rayquant.worker.device import peak_memory_bytes

    seen, source = peak_memory_bytes()
    device, capacity, reserved = "cpu", None, None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        index = torch.cuda.current_device()
        device = f"cuda:{index}"
        capacity = int(torch.cuda.get_device_properties(index).total_memory)
        reserved = int(torch.cuda.max_memory_reserved(index))
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
    return WorkerOutOfMemory(OutOfMemoryReport(
        rank=rank, node_type=node_type, step=reached["step"], device=device, seen_bytes=int(seen),
        seen_source=source, capacity_bytes=capacity, reserved_bytes=reserved,
        message=f"{type(exc).__name__}: {first_line}").to_json())
