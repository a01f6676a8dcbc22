"""The `overhead` term: CUDA context, cuBLAS workspaces and caching-allocator slack.

Only the workspaces are inside torch's allocator; the context is outside torch entirely and the
slack is reserved but not allocated, so a calibration (allocated vs allocated) leaves both alone.
The CPU pseudo-device has neither context nor workspaces.
"""

from __future__ import annotations

from planner.hardware import MIB, GpuSpec

# CUDA context of a PyTorch process with lazy module loading (CUDA 12, the default since torch 2.1):
# 300-600 MiB depending on GPU and driver; transformers' model_memory_anatomy measured 1,343 MB with
# eager loading. We take 512 MiB. It is outside torch's allocator but inside NVML's total.
CUDA_CONTEXT_BYTES = 512 * MIB
# cuBLAS(Lt) workspaces: torch allocates 32 MiB per handle/stream on Hopper (4 MiB before), plus
# the flash/SDPA and cuDNN scratch: 64 MiB together. Unlike the context, these come from torch's
# caching allocator (CublasHandlePool.cpp getNewWorkspace), so they count in max_memory_allocated.
CUDA_WORKSPACE_BYTES = 64 * MIB
# Caching-allocator slack at the memory limit, as a fraction of the per-step transients: when a
# cudaMalloc fails, torch's caching allocator frees its cached blocks and retries before it raises
# OOM, so what limits a step is what it cannot give back (blocks split by smaller requests). FITTED:
# scripts/fit_constants.py derives it from the fit rows of tests/data/validation.json (published
# longest sequences at the limit); a test keeps this value equal to the derivation. Reserved memory
# with no pressure runs higher (the H200 runs: 35-125% of the transients, docs/planner.md), which
# the plan's safety margin covers.
ALLOCATOR_SLACK = 0.09


def context_bytes(gpu: GpuSpec) -> int:
    """The CUDA context (CUDA_CONTEXT_BYTES) on a GPU; none on the CPU."""
    return 0 if gpu.is_cpu else CUDA_CONTEXT_BYTES


def workspace_bytes(gpu: GpuSpec) -> int:
    """cuBLAS and attention workspaces (CUDA_WORKSPACE_BYTES) on a GPU; none on the CPU."""
    return 0 if gpu.is_cpu else CUDA_WORKSPACE_BYTES


def slack_bytes(transient_bytes: int) -> int:
    """Allocator slack on the per-step transients (activations + logits): ALLOCATOR_SLACK of them."""
    return int(ALLOCATOR_SLACK * transient_bytes)
