"""Pod sizes from the plan: CPUs, host memory and GPUs of the head pod and of one worker pod per
node, each term named."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from planner.hardware import GIB
from planner.plan import NodePlan
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


@dataclass(frozen=True)
class PodSize:
    """Container requests (= limits) of one pod, and each term that went into them."""

    cpus: int
    memory_bytes: int
    gpus: int
    terms_bytes: Mapping[str, int] = field(default_factory=dict)

    @property
    def memory_gib(self) -> int:
        return math.ceil(self.memory_bytes / GIB)


def worker_pod_size(node: NodePlan, cpus_per_worker: int = 1) -> PodSize:
    """CPUs and host memory of one worker pod (one Kubernetes node of this node type);
    `cpus_per_worker` is what Ray Train reserves per worker (scaling.cpus_per_worker)."""
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
                   gpus=0 if node.gpu == CPU_DEVICE else node.gpus_per_node, terms_bytes=terms)


def head_pod_size() -> PodSize:
    return PodSize(cpus=HEAD_CPUS, memory_bytes=HEAD_MEMORY_BYTES, gpus=0,
                   terms_bytes={"driver_and_gcs": HEAD_MEMORY_BYTES})
