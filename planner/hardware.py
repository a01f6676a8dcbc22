"""GPUs and node types: the GPU catalog (data with sources), lookups, and inventory specs.

TODO(catalog helper): catalog rows, lookup_gpu, parse_gpu_spec, closest-name errors.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


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

    @property
    def supports_bf16(self) -> bool:
        return self.compute_capability >= (8, 0)

    @property
    def supports_fp8(self) -> bool:
        return self.compute_capability >= (8, 9)


@dataclass(frozen=True)
class NodeType:
    """A group of identical nodes: `count` nodes with `gpus_per_node` GPUs of one kind each."""

    gpu: GpuSpec
    gpus_per_node: int
    count: int
    host_memory_bytes: int = 0  # 0: unknown
    cpus_per_node: int = 0  # 0: unknown
    node_ids: tuple[str, ...] = ()  # Ray node ids when read from a live cluster

    @property
    def key(self) -> str:
        return f"{self.gpu.name}:{self.gpus_per_node}"
