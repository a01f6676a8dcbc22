"""Pod sizes from the plan: CPUs, host memory, GPUs and (worker pods) ephemeral storage of the head
pod and of one worker pod per node, each term named."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from planner.architecture import ModelSpec
from planner.hardware import GIB
from planner.memory.weights import weight_bytes
from planner.plan import NodePlan
from planner.tensor_bytes import SIXTEEN_BIT_BYTES
from rayquant.placement import CPU_DEVICE

# CPUs: what Ray Train reserves per worker (the config's scaling.cpus_per_worker, default 1, which
# rayquant.placement puts into resources_per_worker) plus one per worker for tokenization and batch
# collation in the same process tree, plus one per pod for the raylet, dashboard agent and log
# monitor. Kept small so 1-GPU cloud nodes (4 vCPUs, e.g. g5.xlarge) fit after kubelet reservations.
DATA_CPUS_PER_WORKER = 1
RAY_SYSTEM_CPUS = 1
# Host memory per worker process: the CUDA context's host side plus torch, transformers, TRL and
# Unsloth imported (~3 GiB RSS measured for such a process), the tokenized dataset shard and
# DataLoader buffers; rounded up.
WORKER_PROCESS_BYTES = 6 * GIB
# Loading reads one safetensors shard at a time into host memory before it moves to the GPU; hub
# checkpoints were mostly saved with transformers 4.x's default max_shard_size="5GB".
CHECKPOINT_SHARD_BYTES = 5 * 10**9
# raylet + GCS client + dashboard agent + log monitor RSS on a worker pod, rounded up.
RAY_SYSTEM_BYTES = 2 * GIB
# The head runs the driver (`rayquant train`: config, plan, adapter gathering) and the GCS/dashboard.
HEAD_CPUS = 4
HEAD_MEMORY_BYTES = 16 * GIB
# Ephemeral storage of a worker pod beside the model: Ray's session directory under /tmp/ray (the
# raylet's and each worker's logs, objects spilled from the object store: tokenized dataset
# blocks), the local copy of a checkpoint before Ray Train persists it, Unsloth's compiled cache.
RAY_TEMP_BYTES = 10 * GIB
# How a pre-quantized checkpoint's linears are stored, as planner.memory.weights names the
# schemes; any other checkpoint is 16-bit (or 32-bit) safetensors.
CHECKPOINT_SCHEMES = {"bnb-4bit": "nf4", "fp8": "fp8"}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class PodSize:
    """Container requests (= limits) of one pod, and each term that went into them."""

    cpus: int
    memory_bytes: int
    gpus: int
    terms_bytes: Mapping[str, int] = field(default_factory=dict)
    ephemeral_bytes: int = 0  # 0: no ephemeral-storage request
    ephemeral_terms_bytes: Mapping[str, int] = field(default_factory=dict)

    @property
    def memory_gib(self) -> int:
        return math.ceil(self.memory_bytes / GIB)

    @property
    def ephemeral_gib(self) -> int:
        return math.ceil(self.ephemeral_bytes / GIB)


def checkpoint_bytes(model: ModelSpec) -> int:
    """Bytes of the model's weight files as the Hub serves them (what a pod downloads): the
    weights term of planner.memory for the checkpoint's storage scheme (NF4 or FP8 for pre-quantized
    checkpoints, else 16-bit), scaled to the checkpoint's dtype (float32 checkpoints are twice that).
    A scheme planner.memory does not price (e.g. MXFP4) is counted 16-bit: more than the files."""
    scheme = CHECKPOINT_SCHEMES.get(model.prequantized or "", "bf16")
    weights = weight_bytes(model, quantization=scheme, double_quant=True, backend="unsloth",
                           protected_bytes=0)
    if scheme == "bf16":
        weights = weights * DTYPE_BYTES.get(model.torch_dtype, SIXTEEN_BIT_BYTES) // SIXTEEN_BIT_BYTES
    return weights


def fp8_artifact_bytes(model: ModelSpec) -> int:
    """Bytes of the FP8 copy Unsloth's load_in_fp8 quantizes the checkpoint into and saves under
    the container's temp dir (unsloth/models/loader_utils.py _offline_quantize_to_fp8)."""
    return weight_bytes(model, quantization="fp8", double_quant=True, backend="unsloth", protected_bytes=0)


def worker_ephemeral_terms(node: NodePlan, model: ModelSpec | None, cached: bool) -> dict[str, int]:
    """Ephemeral storage terms of one worker pod: Ray's temp dir; the model's files when there is no
    shared model cache (one copy per pod: its workers share the container's Hub cache); the FP8
    copies Unsloth writes when the node loads FP8 through it (each worker quantizes and saves its
    own before one of them is kept). `model` may be None only when neither model term applies."""
    terms = {"ray_temp": RAY_TEMP_BYTES}
    if needs_model_spec([node], cached) and model is None:
        raise ValueError("worker_ephemeral_terms needs the model's shape for this node")
    if not cached:
        terms["model_download"] = checkpoint_bytes(model)
    if _unsloth_fp8(node) and model.prequantized != "fp8":
        terms["fp8_artifacts"] = node.workers_per_node * fp8_artifact_bytes(model)
    return terms


def _unsloth_fp8(node: NodePlan) -> bool:
    return node.quantization == "fp8" and node.fp8_path == "unsloth"


def needs_model_spec(nodes, cached: bool) -> bool:
    """Whether worker_ephemeral_terms needs the model's shape for these node plans."""
    return not cached or any(_unsloth_fp8(n) for n in nodes)


def worker_pod_size(node: NodePlan, cpus_per_worker: int = 1,
                    ephemeral_terms: Mapping[str, int] | None = None) -> PodSize:
    """CPUs and host memory of one worker pod (one Kubernetes node of this node type);
    `cpus_per_worker` is what Ray Train reserves per worker (scaling.cpus_per_worker);
    `ephemeral_terms` from worker_ephemeral_terms (None: no ephemeral-storage request)."""
    workers = node.workers_per_node
    terms = {
        "ray_system": RAY_SYSTEM_BYTES,
        "worker_processes": workers * WORKER_PROCESS_BYTES,
        "checkpoint_shard_staging": workers * CHECKPOINT_SHARD_BYTES,
        # The planner's host RAM per worker: offloaded activations, paged optimizer states.
        "plan_host_memory": workers * node.host_memory_bytes,
    }
    return PodSize(cpus=workers * (cpus_per_worker + DATA_CPUS_PER_WORKER) + RAY_SYSTEM_CPUS,
                   memory_bytes=sum(terms.values()),
                   gpus=0 if node.gpu == CPU_DEVICE else node.gpus_per_node, terms_bytes=terms,
                   ephemeral_bytes=sum((ephemeral_terms or {}).values()),
                   ephemeral_terms_bytes=dict(ephemeral_terms or {}))


def head_pod_size() -> PodSize:
    return PodSize(cpus=HEAD_CPUS, memory_bytes=HEAD_MEMORY_BYTES, gpus=0,
                   terms_bytes={"driver_and_gcs": HEAD_MEMORY_BYTES})
