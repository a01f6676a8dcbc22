"""Why: the one-line reason for each choice of a node plan, and, for a node type where nothing fits,
how much memory is missing and what would fix it. Settings are named as {placeholders} that each
face spells its own way (planner.vocab)."""

from __future__ import annotations

import math
from typing import Mapping

from planner.architecture import ModelSpec
from planner.hardware import GIB, fp8_path_for
from planner.memory import estimate_memory, max_seq_len
from planner.plan import JobSpec
from planner.search.candidates import Candidate, TypeSearch
from planner.search.policy import (BALANCED_SPEEDUP, SIXTEEN_BIT, backend_for, checkpointing_modes, compute_dtype,
                                   placement_quantizations)

FP8_PATH_NAMES = {"unsloth": "Unsloth load_in_fp8", "rowwise": "rayquant's row-wise FP8 linear"}


def _smallest_peak(model: ModelSpec, ts: TypeSearch, job: JobSpec, q: str) -> int:
    """The predicted peak of `q`'s smallest configuration on one GPU of `ts` (micro-batch 1 or the
    pinned one, recomputation, 8-bit AdamW unless pinned)."""
    backend = backend_for(ts.placement, job)
    modes = checkpointing_modes(job, backend)
    ckpt = "hf" if "hf" in modes else modes[-1]
    shards = ts.node_type.num_gpus if ts.placement == "zero3" else 1
    return estimate_memory(model, ts.node_type.gpu, quantization=q, double_quant=job.double_quant,
                           backend=backend,
                           seq_len=job.seq_len, micro_batch_size=job.micro_batch_size or 1,
                           lora_rank=job.lora_rank, lora_targets=job.lora_targets,
                           full_finetune=job.full_finetune, gradient_checkpointing=ckpt,
                           optimizer=job.optimizer or "adamw_8bit", num_shards=shards).peak_bytes


def _compared(ts: TypeSearch, cfg: Candidate, job: JobSpec, options: Mapping[str, Candidate | None],
              model: ModelSpec | None) -> str:
    """'nf4 (1,420 tok/s) and bf16 (does not fit: 31.2 GiB > 22.1 GiB)': the quantizations tried
    besides the chosen one, each with its predicted tokens/s or why it is out."""
    out = []
    for q in ts.quantizations:
        if q == cfg.quantization:
            continue
        c = options.get(q)
        if c is not None:
            out.append(f"{q} ({c.tokens_per_s:,.0f} tok/s)")
        elif model is not None and ts.placement != "node-spanning":
            need = _smallest_peak(model, ts, job, q)
            out.append(f"{q} (does not fit: {need / GIB:.1f} GiB > {ts.budget / GIB:.1f} GiB)")
        else:
            out.append(f"{q} (does not fit)")
    return " and ".join([", ".join(out[:-1]), out[-1]] if len(out) > 2 else out)


def _quantization_reason(ts: TypeSearch, cfg: Candidate, job: JobSpec,
                         options: Mapping[str, Candidate | None] | None = None,
                         model: ModelSpec | None = None) -> str:
    gpu = ts.node_type.gpu
    q = cfg.quantization
    path = fp8_path_for(gpu.compute_capability)
    if job.quantization:
        return f"pinned to {q}" + (f" (FP8 via {FP8_PATH_NAMES[path]})" if q == "fp8" and path else "")
    head = {"fp8": f"FP8 via {FP8_PATH_NAMES.get(path, 'FP8')}",
            "dynamic-4bit": "dynamic 4-bit (NF4 + double quant, sensitive modules kept 16-bit within "
                            "the spare memory)",
            "nf4": "4-bit NF4 weights as stored"}.get(q, f"{q} weights")
    if cfg.placement == "zero3" and q not in SIXTEEN_BIT:
        head += f", packed in {compute_dtype(gpu)} storage so ZeRO-3 shards them (QLoRA + ZeRO-3)"
    if job.full_finetune:
        why = "full fine-tuning needs 16-bit weights"
    elif model is not None and model.prequantized == "bnb-4bit":
        why = "the only scheme for this checkpoint"
    elif job.prefer == "accuracy":
        why = "the most precise that fits"
    else:
        why = "the fastest predicted that fits"
        fastest = max((c for c in (options or {}).values() if c is not None), key=lambda c: c.tokens_per_s,
                      default=cfg)
        if job.prefer == "balanced" and fastest.tokens_per_s > cfg.tokens_per_s:
            why = (f"within {BALANCED_SPEEDUP - 1:.0%} of the fastest predicted, balanced keeps the more "
                   "precise")
    text = f"{q}: {head}; {why} ({cfg.tokens_per_s:,.0f} tok/s)"
    compared = _compared(ts, cfg, job, options or {}, model)
    if compared:
        text += f", over {compared}"
    if not gpu.supports_bf16 and q in SIXTEEN_BIT:
        text += f"; {gpu.name} has no bf16, so fp16 compute"
    if ts.notes.get("fp8"):
        text += f"; {ts.notes['fp8']}"
    return text


def reasons(ts: TypeSearch, cfg: Candidate, job: JobSpec, accum: int, samples: int,
            options: Mapping[str, Candidate | None] | None = None,
            model: ModelSpec | None = None) -> dict[str, str]:
    """Choice -> one-line reason, for the NodePlan of `ts`'s node type. `options`: each tried
    quantization's best candidate (None: nothing fits), which the quantization's reason compares."""
    gpu = ts.node_type.gpu
    r = {"quantization": _quantization_reason(ts, cfg, job, options, model)}
    if ts.notes.get("quantization"):
        r["quantization"] = ts.notes["quantization"] + "; " + r["quantization"]
    r["micro_batch_size"] = (f"pinned to {cfg.micro_batch}" if job.micro_batch_size else
                             f"largest divisor of this worker's {samples} samples per step that fits "
                             f"(peak {cfg.peak_bytes / GIB:.1f} of {ts.budget / GIB:.1f} GiB budget)")
    r["gradient_accumulation_steps"] = (f"{accum} x {cfg.micro_batch} = {samples} samples per step, "
                                        "its share of the global batch by predicted speed")
    r["optimizer"] = (f"pinned to {cfg.optimizer}" if job.optimizer else
                      "adamw_torch fits: exact fp32 states" if cfg.optimizer == "adamw_torch" else
                      f"{cfg.optimizer}: 32-bit AdamW states do not fit as well (memory is tight)")
    r["gradient_checkpointing"] = (f"pinned to {cfg.checkpointing}" if job.gradient_checkpointing else
                                   "none: activations fit, no recomputation"
                                   if cfg.checkpointing == "none" else
                                   f"{cfg.checkpointing}: activations of every layer do not fit; "
                                   f"recompute (+{33 if job.full_finetune else 50}% GEMM work: one more forward)" + (", layer inputs offloaded to host RAM"
                                                                  if cfg.checkpointing == "unsloth" else ""))
    r["placement"] = {
        "per-gpu": "one worker per GPU (DDP): the model fits one GPU",
        "node-spanning": f"one worker spans the node's {ts.node_type.gpus_per_node} GPUs with a "
                         "layer map: one GPU cannot hold the model",
        "zero3": f"ZeRO-3 over {ts.node_type.num_gpus} GPUs (hf backend): not even a node's GPUs "
                 f"hold the model; each GPU keeps 1/{ts.node_type.num_gpus} of it "
                 f"({cfg.estimate.breakdown.weights / GIB:.1f} GiB of weights with the module being "
                 "gathered)" + (f"; the 4-bit base loads whole into host RAM first "
                                f"({cfg.estimate.host_bytes / GIB:.1f} GiB per worker)"
                                if cfg.quantization not in SIXTEEN_BIT else ""),
    }[cfg.placement]
    r["safety_margin"] = f"{job.safety_margin:.0%} of {gpu.memory_gib:.1f} GiB kept free"
    return r


def shortfall(model: ModelSpec, ts: TypeSearch, job: JobSpec) -> str:
    """For a node type where nothing fits: how much memory its smallest configuration lacks and
    what would fix it."""
    nt, gpu = ts.node_type, ts.node_type.gpu
    micro = job.micro_batch_size or 1
    # The last placement tried: ZeRO-3 over the type's GPUs where it has several and can shard the
    # allowed weights (placements, placement_quantizations).
    sharded = placement_quantizations(ts.quantizations, "zero3") if nt.num_gpus > 1 else ()
    quant = (sharded or ts.quantizations)[-1]
    backend = backend_for("zero3", job) if sharded else job.backend
    modes = checkpointing_modes(job, backend)
    ckpt = "hf" if "hf" in modes else modes[-1]
    opt = job.optimizer or "adamw_8bit"
    kw = dict(quantization=quant, double_quant=job.double_quant, backend=backend,
              micro_batch_size=micro, lora_rank=job.lora_rank, lora_targets=job.lora_targets,
              full_finetune=job.full_finetune, gradient_checkpointing=ckpt, optimizer=opt,
              num_shards=nt.num_gpus if sharded else 1)
    need = estimate_memory(model, gpu, seq_len=job.seq_len, **kw).peak_bytes
    fixes = []
    fits_len = max_seq_len(model, gpu, safety_margin=job.safety_margin, **kw)
    if fits_len > 0:
        fixes.append(f"shorter sequences ({{seq_len}} {fits_len} fits)")
    if quant in SIXTEEN_BIT and not job.full_finetune:
        fixes.append("4-bit ({quantization} dynamic-4bit)")
    if nt.num_gpus > 1 and not sharded:
        fixes.append(f"ZeRO-3 over the {nt.num_gpus} GPUs, which shards {{quantization}} bf16 or nf4 "
                     "but not fp8")
    if job.full_finetune:
        fixes.append("LoRA instead of full fine-tuning")
    elif len(job.lora_targets) > 2 or "all" in job.lora_targets:
        fixes.append("fewer LoRA targets ({lora_targets} q_proj,v_proj)")
    fixes.append(f"a GPU with at least {math.ceil(need / (1.0 - job.safety_margin) / GIB)} GiB")
    zero3 = f", ZeRO-3 over {nt.num_gpus} GPUs" if sharded else ""
    return (f"{nt.key} ({gpu.memory_gib:.0f} GiB GPUs): the smallest configuration ({quant}, "
            f"micro-batch {micro}, {ckpt} checkpointing, {opt}{zero3}) needs {need / GIB:.1f} GiB per GPU, "
            f"{(need - ts.budget) / GIB:.1f} GiB more than the {ts.budget / GIB:.1f} GiB budget "
            f"({job.safety_margin:.0%} margin). To fix: " + ", or ".join(fixes))
