"""Which configurations the search may try on a node type, and which of two is better.

The allowed quantizations (pins, full fine-tuning, pre-quantized checkpoints, the GPU's FP8 path),
micro-batches, checkpointing modes and placements, in the order the search tries them; `better`
is the preference between two configurations that fit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from planner.architecture import ModelSpec
from planner.hardware import GIB, GpuSpec, NodeType, fp8_path_for
from planner.memory import budget_bytes
from planner.plan import JobSpec, PlanError
from planner.vocab import OPTIMIZERS

if TYPE_CHECKING:
    from planner.search.candidates import Candidate

MAX_MICRO_BATCH = 64
# Ties (and prefer=accuracy) go to the more precise weights: 16-bit, then FP8, then 4-bit with
# 16-bit modules protected, then plain NF4.
PRECISION_RANK = {"bf16": 0, "fp16": 0, "fp8": 1, "dynamic-4bit": 2, "nf4": 3}
SIXTEEN_BIT = ("bf16", "fp16")
# What ZeRO-3 can shard: 16-bit weights, and NF4 whose packed codes are stored in the compute dtype
# (bnb_4bit_quant_storage), so DeepSpeed flattens one dtype. Not FP8: the hf backend has no FP8 path
# (rayquant.loading) and DeepSpeed 0.19 partitions no float8 weight with its row scales.
ZERO3_QUANTIZATIONS = SIXTEEN_BIT + ("nf4", "dynamic-4bit")


def sixteen_bit(gpu: GpuSpec) -> str:
    """The 16-bit scheme this GPU trains in: bf16 from compute capability 8.0, else fp16."""
    return "bf16" if gpu.supports_bf16 else "fp16"


def compute_dtype(gpu: GpuSpec) -> str:
    """The dtype a node plan computes in (and, under ZeRO-3, packs 4-bit codes into): bfloat16
    where the GPU has it (and on CPU), else float16."""
    return "bfloat16" if gpu.supports_bf16 or gpu.is_cpu else "float16"


def allowed_quantizations(model: ModelSpec, gpu: GpuSpec, job: JobSpec) -> tuple[tuple[str, ...], dict]:
    """The quantizations to try on `gpu`, most precise first, and notes for the reasons.

    A pin is honoured or refused (FP8 without FP8 tensor cores, 4-bit with full fine-tuning); bf16
    pinned on a GPU without bf16 becomes fp16. Unpinned: full fine-tuning is 16-bit only, a
    bitsandbytes 4-bit checkpoint stays NF4, else 16-bit, FP8 where an FP8 path runs (Unsloth's on
    cc >= 9.0; rayquant's row-wise linear on cc 8.9, where the 16-bit weights must fit to load),
    then dynamic 4-bit. Every preference tries the same ones: which is fastest is the throughput
    model's answer (planner.throughput), so balanced and speed agree.
    """
    notes: dict[str, str] = {}
    fp8_path = fp8_path_for(gpu.compute_capability)
    if job.quantization is not None:
        q = job.quantization
        if q == "fp8" and fp8_path is None:
            raise PlanError(f"{{quantization}} fp8 is pinned but {gpu.name} (compute capability "
                            f"{gpu.compute_capability_str}) has no FP8 tensor cores. To fix: set "
                            "{quantization} to dynamic-4bit or bf16 there, or leave it to the planner.")
        if q == "bf16" and not gpu.supports_bf16:
            notes["quantization"] = f"bf16 pinned, but {gpu.name} has no bf16: fp16 compute"
            q = "fp16"
        if job.full_finetune and q not in SIXTEEN_BIT:
            raise PlanError(f"{{quantization}} {q} is pinned with {{full_finetune}}, which needs 16-bit "
                            "weights. To fix: set {quantization} to bf16, or train LoRA adapters.")
        return (q,), notes
    if job.full_finetune:
        return (sixteen_bit(gpu),), notes
    if model.prequantized == "bnb-4bit":
        notes["quantization"] = f"{model.name} is a pre-quantized bitsandbytes 4-bit checkpoint"
        return ("nf4",), notes
    out = [sixteen_bit(gpu)]
    if fp8_path == "unsloth":
        out.append("fp8")
    elif fp8_path == "rowwise":
        # cc 8.9: the worker loads the 16-bit weights onto the GPU, then converts the linears to
        # FP8 (rayquant/fp8.py): FP8 is a choice only where those 16-bit weights fit the budget.
        load = 2 * model.num_params
        budget = budget_bytes(gpu.memory_bytes, job.safety_margin)
        if load <= budget:
            out.append("fp8")
        else:
            notes["fp8"] = (f"fp8 not tried: on compute capability {gpu.compute_capability_str} the "
                            f"worker loads the 16-bit weights first ({load / GIB:.1f} GiB > "
                            f"{budget / GIB:.1f} GiB budget)")
    out.append("dynamic-4bit")
    return tuple(out), notes


def micro_batches(job: JobSpec) -> tuple[int, ...]:
    """The pinned micro-batch, else powers of two up to MAX_MICRO_BATCH."""
    if job.micro_batch_size is not None:
        return (job.micro_batch_size,)
    return tuple(2**i for i in range(int(math.log2(MAX_MICRO_BATCH)) + 1))


def checkpointing_modes(job: JobSpec, backend: str) -> tuple[str, ...]:
    """The pinned checkpointing mode, else none and the backend's own (hf or unsloth)."""
    if job.gradient_checkpointing is not None:
        return (job.gradient_checkpointing,)
    return ("none", backend)


def backend_for(placement: str, job: JobSpec) -> str:
    """ZeRO-3 runs on the hf backend (DeepSpeed); the other placements on the job's."""
    return "hf" if placement == "zero3" else job.backend


def placements(nt: NodeType) -> list[tuple[str, int]]:
    """(placement, workers per node) in the order tried: a worker per GPU, then one worker
    spanning a node's GPUs, then ZeRO-3 over all of the type's GPUs."""
    out = [("per-gpu", nt.gpus_per_node)]
    if nt.gpus_per_node > 1:
        out.append(("node-spanning", 1))
    if nt.num_gpus > 1:
        out.append(("zero3", nt.gpus_per_node))
    return out


def placement_quantizations(quantizations: tuple[str, ...], placement: str) -> tuple[str, ...]:
    """The quantizations tried under `placement`. ZeRO-3 (the hf backend) shards 16-bit weights and
    4-bit ones packed into 16-bit storage (ZERO3_QUANTIZATIONS), not FP8: a pinned fp8 gets no
    ZeRO-3 candidate."""
    if placement != "zero3":
        return quantizations
    return tuple(q for q in quantizations if q in ZERO3_QUANTIZATIONS)


# prefer=balanced keeps the more precise weights unless the less precise are predicted at least this
# much faster: well beyond the throughput model's error on its check rows (docs/planner.md).
BALANCED_SPEEDUP = 1.10


def better(a: "Candidate | None", b: "Candidate | None", job: JobSpec) -> bool:
    """Is a better than b? Faster wins; ties go to more precision, the exact optimizer, less
    recomputation. prefer=accuracy puts precision before speed; prefer=balanced lets less precise
    weights win only when they are BALANCED_SPEEDUP faster."""
    if a is None:
        return False
    if b is None:
        return True
    if job.prefer == "accuracy" and PRECISION_RANK[a.quantization] != PRECISION_RANK[b.quantization]:
        return PRECISION_RANK[a.quantization] < PRECISION_RANK[b.quantization]
    if job.prefer == "balanced" and PRECISION_RANK[a.quantization] != PRECISION_RANK[b.quantization]:
        # Less precise weights must buy a speed-up the throughput model can tell from its error.
        precise, other = (a, b) if PRECISION_RANK[a.quantization] < PRECISION_RANK[b.quantization] else (b, a)
        return (a is precise) == (other.tokens_per_s <= precise.tokens_per_s * BALANCED_SPEEDUP)
    if not math.isclose(a.tokens_per_s, b.tokens_per_s, rel_tol=1e-9):
        return a.tokens_per_s > b.tokens_per_s

    def key(c: "Candidate") -> tuple:
        return (PRECISION_RANK[c.quantization], OPTIMIZERS.index(c.optimizer), c.checkpointing != "none",
                -c.micro_batch)

    return key(a) < key(b)
