"""The planning service: one way from what a user asks to a TrainingPlan, for every face.

`rayquant plan`, `rayquant k8s` and `RayQuantTrainer.plan()` all plan through these functions:

    job = job_spec(LoraOptions(rank=16), SftOptions(seq_len=2048, global_batch_size=32))
    plan = make_plan("meta-llama/Llama-3.1-8B", node_types(gpus="2x8xH100-80GB"), job,
                     calibration="calibration.json")

- `job_spec`: the planner's JobSpec from the LoRA and SFT options (the YAML `lora:`/`sft:` sections
  and the trainer's arguments; the CLI's flags fill the same options), so one LoRA alpha default
  (planner.vocab.default_lora_alpha) and one mapping hold everywhere.
- `node_types`: the cluster to plan for: a `--gpus` spec and/or an inventory file, else the live Ray
  cluster at an address, else this machine.
- `make_plan`: the model resolved for planning (a catalog id, a local config or directory, or a
  `rayquant/tiny-*` id: rayquant.models.config_path), a calibration file applied, the plan named
  after the model as given.
- `estimate`: one fixed configuration on one GPU (`rayquant estimate`), the model resolved the same
  way.

Light at import: the planner only (Ray only to read a live cluster).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from planner.hardware import NodeType
from planner.plan import JobSpec, TrainingPlan
from planner.vocab import DEFAULT_LORA_RANK
from rayquant.config import LoraOptions, SftOptions

# Worker slots of a CPU-only machine when the caller gives no worker count (the quickstart's two).
DEFAULT_CPU_WORKERS = 2


def job_spec(lora: LoraOptions, sft: SftOptions, *, safety_margin: float | None = None,
             full_finetune: bool = False) -> JobSpec:
    """The planner's JobSpec for these options. `safety_margin` (None: JobSpec's default) and
    `full_finetune` are planner settings the YAML config does not have. Raises PlanError."""
    extra = {} if safety_margin is None else {"safety_margin": safety_margin}
    return JobSpec(seq_len=sft.seq_len, global_batch_size=sft.global_batch_size, lora_rank=lora.rank,
                   lora_alpha=lora.effective_alpha, lora_dropout=lora.dropout, lora_targets=lora.targets,
                   full_finetune=full_finetune, prefer=sft.prefer, backend=sft.backend,
                   quantization=sft.quantization, optimizer=sft.optimizer,
                   micro_batch_size=sft.micro_batch_size,
                   gradient_checkpointing=sft.gradient_checkpointing, packing=sft.packing, **extra)


def node_types(*, gpus: str | None = None, inventory: str | None = None, address: str | None = None,
               cpu_workers: int | None = None) -> tuple[NodeType, ...]:
    """The cluster to plan for.

    `gpus` ("2x8xH100-80GB,4x1xA10G") and/or an `inventory` file (rayquant.inventory) describe it
    offline (both: their node types together). Otherwise the live Ray cluster at `address` (the
    caller resolves RAY_ADDRESS: rayquant.cluster.ray_address) is read, else this machine: its GPUs
    through NVML, or, without a GPU, one CPU node of `cpu_workers` worker slots (default
    DEFAULT_CPU_WORKERS). Raises PlanError (InventoryError, ClusterConnectError) with a fix."""
    if gpus or inventory:
        from planner.hardware import parse_gpu_spec
        from rayquant.inventory import load_inventory_file

        return (parse_gpu_spec(gpus) if gpus else ()) + (load_inventory_file(inventory) if inventory else ())
    from rayquant import inventory as live

    if address:
        return live.discover_node_types(address)
    local = live.local_node_types()
    if any(not nt.gpu.is_cpu for nt in local):
        return local
    # The CPU pseudo-device offers worker slots, not GPUs: as many as the run asks for.
    return tuple(dataclasses.replace(nt, gpus_per_node=cpu_workers or DEFAULT_CPU_WORKERS) for nt in local)


def model_spec(model: str):
    """The planner's ModelSpec of `model` (rayquant.models.config_path: a Hub id not in the catalog
    fetches its config.json alone), named as the user named it rather than by its cache path."""
    import planner
    from rayquant.models import config_path

    path = config_path(model)
    spec = planner.load_model_spec(path)
    return dataclasses.replace(spec, name=model) if path != model and spec.name == path else spec


def make_plan(model: str, node_types: Sequence[NodeType], job: JobSpec,
              calibration: str | None = None) -> TrainingPlan:
    """Plan `model` on `node_types` for `job`; `calibration` is a `rayquant calibrate` file whose
    measured/predicted ratios scale memory and tokens/s. The plan carries `model` as given (what
    the workers load). Raises PlanError (UnknownModelError, CalibrationError, ...) with a fix."""
    import planner
    from planner.calibration import Calibration

    spec = model_spec(model)
    loaded = Calibration.load(calibration) if calibration else None
    return dataclasses.replace(planner.make_plan(spec, node_types, job, calibration=loaded), model=model)


def estimate(model: str, gpu: str, *, quantization: str = "nf4", double_quant: bool = True,
             backend: str = "unsloth", seq_len: int = 2048, micro_batch_size: int = 1,
             lora_rank: int = DEFAULT_LORA_RANK, lora_targets: tuple[str, ...] = ("all",),
             full_finetune: bool = False, gradient_checkpointing: str = "unsloth",
             optimizer: str = "adamw_8bit", calibration: str | None = None) -> dict[str, Any]:
    """One worker's predicted peak memory (with its breakdown), the longest sequence that fits and
    tokens/s for one fixed configuration on one GPU, as plain data (`rayquant estimate --json`).
    Raises PlanError with a fix."""
    import planner
    from planner.calibration import Calibration, calibrated_peak_bytes
    from planner.plan import PlanError

    spec = model_spec(model)
    device = planner.lookup_gpu(gpu)
    notes = []
    if gradient_checkpointing == "unsloth" and backend == "hf":
        raise PlanError("{gradient_checkpointing} unsloth needs {backend} unsloth. To fix: use "
                        "{gradient_checkpointing} hf with {backend} hf")
    if quantization == "bf16" and not device.supports_bf16 and not device.is_cpu:
        notes.append(f"{device.name} has no bf16: the same bytes in fp16")
    if quantization == "fp8" and not device.supports_fp8:
        notes.append(f"{device.name} has no FP8 tensor cores: memory as FP8, no FP8 speedup")
    config = dict(quantization=quantization, double_quant=double_quant, backend=backend,
                  micro_batch_size=micro_batch_size, lora_rank=lora_rank, lora_targets=lora_targets,
                  full_finetune=full_finetune, gradient_checkpointing=gradient_checkpointing,
                  optimizer=optimizer)
    from planner.memory import estimate_with_protection
    from planner.memory.protected import by_error_reason

    est, protection = estimate_with_protection(spec, device, safety_margin=JobSpec.safety_margin,
                                               seq_len=seq_len, **config)
    longest = planner.max_seq_len(spec, device, **config)
    tps = planner.tokens_per_second(spec, device, quantization=quantization, seq_len=seq_len,
                                    micro_batch_size=micro_batch_size, lora_rank=lora_rank,
                                    lora_targets=lora_targets, full_finetune=full_finetune,
                                    gradient_checkpointing=gradient_checkpointing, backend=backend,
                                    optimizer=optimizer)
    factors = None
    peak = est.peak_bytes
    if calibration:
        cal = Calibration.load(calibration)
        factors = {"file": calibration, "memory_factor": cal.memory_factor(device.name, quantization),
                   "throughput_factor": cal.throughput_factor(device.name, quantization)}
        peak = calibrated_peak_bytes(est, factors["memory_factor"])
        tps *= factors["throughput_factor"]
        notes.append(f"calibrated from {calibration}: memory x{factors['memory_factor']:.3f}, "
                     f"tokens/s x{factors['throughput_factor']:.3f}; breakdown and max_seq_len "
                     "are uncalibrated predictions")
    return {
        "model": model, "gpu": device.name, "gpu_memory_bytes": device.memory_bytes,
        "config": {"seq_len": seq_len, **{k: list(v) if isinstance(v, tuple) else v
                                          for k, v in config.items()}},
        "peak_memory_bytes": peak, "predicted_peak_memory_bytes": est.peak_bytes,
        "allocated_bytes": est.allocated_bytes, "reserved_bytes": est.reserved_bytes,
        "breakdown_bytes": est.breakdown.as_dict(), "host_memory_bytes": est.host_bytes,
        "trainable_params": est.trainable_params, "fits": peak <= device.memory_bytes,
        "max_seq_len": longest, "tokens_per_second": tps,
        # The median error of the throughput model on its check rows (docs/planner.md).
        "tokens_per_second_error": planner.throughput.EXPECTED_ERROR,
        "calibration": factors, "notes": notes,
        "protected": None if protection is None else _protected_dict(protection, by_error_reason(protection)),
    }


def _protected_dict(protection, by_error: tuple[int, int]) -> dict[str, Any]:
    """Dynamic 4-bit's protected modules as `estimate` reports them: each module with its bytes and
    why, the budget (what the configuration leaves under the safety margin) and the total."""
    count, nbytes = by_error
    return {"budget_bytes": protection.budget_bytes, "cost_bytes": protection.cost_bytes,
            "candidates": protection.candidates,
            "modules": [{"name": n, "bytes": protection.module_bytes[n], "why": protection.reasons[n]}
                        for n in protection.protected],
            "picked_by_error": {"count": count, "bytes": nbytes}}


def compare(model: str, gpu: str, *, seq_len: int = 2048, micro_batch_size: int = 1,
            lora_rank: int = DEFAULT_LORA_RANK, lora_targets: tuple[str, ...] = ("all",),
            double_quant: bool = True, optimizer: str = "adamw_8bit",
            calibration: str | None = None) -> dict[str, Any]:
    """Every quantization with both backends side by side for one model and GPU (`rayquant estimate
    --compare`): each row is `estimate` with the backend's own checkpointing (unsloth: its offload;
    hf: torch's), or the reason it cannot run (FP8 has no hf path). One document for `--json`."""
    from planner.plan import PlanError
    from planner.vocab import BACKENDS, QUANTIZATIONS

    out_rows, head = [], None
    for quantization in QUANTIZATIONS:
        for backend in BACKENDS:
            row = {"quantization": quantization, "backend": backend, "gradient_checkpointing": backend}
            if backend == "hf" and quantization == "fp8":
                out_rows.append({**row, "available": False,
                                 "reason": "the hf backend has no FP8 path (FP8 runs through Unsloth)"})
                continue
            try:
                r = estimate(model, gpu, quantization=quantization, double_quant=double_quant,
                             backend=backend, seq_len=seq_len, micro_batch_size=micro_batch_size,
                             lora_rank=lora_rank, lora_targets=lora_targets, gradient_checkpointing=backend,
                             optimizer=optimizer, calibration=calibration)
            except PlanError as e:
                out_rows.append({**row, "available": False, "reason": str(e)})
                continue
            head = head or r
            protected = r["protected"]["cost_bytes"] if r["protected"] else 0
            out_rows.append({**row, "available": True, "peak_memory_bytes": r["peak_memory_bytes"],
                             "fits": r["fits"], "max_seq_len": r["max_seq_len"],
                             "tokens_per_second": r["tokens_per_second"],
                             "host_memory_bytes": r["host_memory_bytes"], "protected_bytes": protected,
                             "notes": r["notes"]})
    if head is None:
        raise PlanError(f"no quantization can be estimated for {model} on {gpu}: "
                        + "; ".join(r["reason"] for r in out_rows))
    return {"model": model, "gpu": head["gpu"], "gpu_memory_bytes": head["gpu_memory_bytes"],
            "config": {"seq_len": seq_len, "micro_batch_size": micro_batch_size, "lora_rank": lora_rank,
                       "lora_targets": list(lora_targets), "double_quant": double_quant,
                       "optimizer": optimizer, "calibration": calibration},
            "rows": out_rows}
