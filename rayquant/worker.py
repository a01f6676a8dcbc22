"""The Ray Train worker: find this rank's settings in the plan, check the device, load, train.

Heterogeneous DDP (ranks with different micro-batch x accumulation) stays correct because:
- each rank's shard is cut from the same global batches (rayquant.data.shard_indices) and read in
  order; accelerate's per-process re-sharding of the loader is switched off;
- every rank runs the same max_steps, and DDP all-reduces once per optimizer step (transformers
  runs the other micro-steps under `no_sync`);
- transformers sums the label tokens of each rank's accumulation window and all-reduces the sum
  (`average_tokens_across_devices`, Trainer._get_num_items_in_batch); the loss of each micro-batch
  is its token-loss sum over that global count, times the world size, so DDP's average of the
  gradients is the token mean over the whole global batch (Trainer.compute_loss);
- per-micro-batch collectives would pair up wrongly when ranks take different numbers of
  micro-steps, so TRL's metric gathers run rank-locally and DDP does not broadcast buffers.

Ranks may also load different bases (FP8 on one node type, dynamic 4-bit on another): DDP ignores
every frozen parameter and buffer, so only the LoRA parameters are broadcast and all-reduced, and
every rank keeps them in fp32 (keep_adapters_fp32) so their buffers match whatever the base.

ZeRO-3 node plans (rayquant.zero) take DeepSpeed's engine instead of DDP: the SFTConfig with the
DeepSpeed config is built before the model loads, the ranks share one micro-batch x accumulation,
and every rank all-gathers the LoRA shards before saving, so all ranks hold the same whole adapter.
Checkpoints carry every rank's ZeRO shard (Ray merges the ranks' directories), so a restarted
worker group resumes from them as DDP runs do.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from planner.hardware import CPU_DEVICE, GIB, lookup_gpu
from planner.plan import NodePlan, TrainingPlan

FAIL_MESSAGE = "rayquant fault injection"
CHECKPOINT_SUBDIR = "checkpoint"
STATE_FILE = "rayquant_state.json"


class DeviceMismatchError(RuntimeError):
    """This worker's device is not what the plan was made for."""


def import_unsloth_first() -> None:
    """Ray worker_process_setup_hook: Unsloth patches transformers/TRL only when imported before
    them, and Ray's worker start-up may import transformers before the train loop runs."""
    if os.environ.get("RAYQUANT_BACKEND", "unsloth") == "unsloth":
        import unsloth  # noqa: F401


def check_device(node_plan: NodePlan, rank: int) -> dict[str, Any]:
    """The device this worker runs on, checked against its NodePlan; a mismatch raises."""
    import torch

    if node_plan.gpu == CPU_DEVICE:
        return {"device": "cpu", "name": "CPU", "cpus": os.cpu_count()}
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
    return {"device": f"cuda:{torch.cuda.current_device()}", "name": name, "memory_bytes": total}


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


def build_optimizer(name: str, params, lr: float, weight_decay: float):
    """The plan's optimizer, built here so it runs as planned (Unsloth's CPU path would swap
    bitsandbytes' 8-bit AdamW for torch AdamW, though bitsandbytes runs it on CPU)."""
    import torch

    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay), "bitsandbytes.optim.AdamW8bit"
    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        if torch.cuda.is_available():
            return (bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay),
                    "bitsandbytes.optim.PagedAdamW8bit")
        # Paging moves states to host memory under GPU pressure; with no GPU the states already
        # live there, and the 8-bit update is the same.
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay), "bitsandbytes.optim.AdamW8bit"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), "torch.optim.AdamW"


def _local_gather(tensor, *args, **kwargs):
    return tensor


def sharded_trainer_class(base, model_loss: bool = False):
    """`base` (TRL's SFTTrainer, as Unsloth patched it) reading a pre-cut per-rank shard in order.

    model_loss: take the loss from the model's own forward (transformers' Trainer.compute_loss, the
    same token-sum over the step's all-reduced token count) instead of TRL's fused LM head, whose
    Triton kernel (trl/kernels/chunked_logprob.py) has no CPU driver ("0 active drivers"). Unsloth
    replaces TRL's loss itself, so only the hf backend on CPU needs this.
    """
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import SequentialSampler
    from transformers import Trainer

    class RankShardTrainer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # TRL (and Unsloth's chunked CE) divide each micro-batch's token-loss sum by the
            # all-reduced token count of the step; this flag makes transformers count it
            # (Trainer._get_num_items_in_batch) and not divide again by the accumulation steps.
            self.model_accepts_loss_kwargs = True

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset if train_dataset is None else train_dataset)

        def get_train_dataloader(self):
            loader = super().get_train_dataloader()
            shard = getattr(loader, "batch_sampler", None)
            if isinstance(shard, BatchSamplerShard):  # the rows are already this rank's
                shard.num_processes, shard.process_index = 1, 0
            return loader

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
            # TRL/Unsloth gather metrics across ranks inside every micro-step; with unequal
            # accumulation those collectives would pair up wrongly, so keep them rank-local.
            self.accelerator.gather_for_metrics = _local_gather
            try:
                if model_loss:
                    if model.training and "attention_mask" in inputs:  # TRL's num_tokens metric, rank-local
                        self._total_train_tokens += int(inputs["attention_mask"].sum())
                        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
                    return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                                num_items_in_batch=num_items_in_batch)
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch, **kwargs)
            finally:
                del self.accelerator.gather_for_metrics

    return RankShardTrainer


def _callbacks(config: dict, rank: int, total_steps: int, node_plan: NodePlan):
    import ray.train
    from ray.train import Checkpoint
    from transformers import TrainerCallback

    class RayReport(TrainerCallback):
        """Metrics at every logging step, and each HF checkpoint, to Ray Train (all ranks)."""

        def __init__(self) -> None:
            self.t0 = self.last_t = time.perf_counter()
            self.last_tokens = 0.0
            self.tokens = 0.0
            self.losses: list[tuple[int, float]] = []

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.last_t = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            now = time.perf_counter()
            tokens = float(logs.get("num_tokens", self.tokens))
            window_s = max(now - self.last_t, 1e-9)
            tps = (tokens - self.last_tokens) / window_s if tokens >= self.last_tokens else 0.0
            self.last_t, self.last_tokens, self.tokens = now, tokens, tokens
            if "loss" in logs:
                self.losses.append((state.global_step, float(logs["loss"])))
            metrics = {"step": state.global_step, "total_steps": total_steps, "rank": rank,
                       "tokens_per_s": tps, "elapsed_s": now - self.t0,
                       "predicted_tokens_per_s": node_plan.tokens_per_second}
            metrics.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})
            ray.train.report(metrics)

        def on_save(self, args, state, control, **kw):
            src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            with tempfile.TemporaryDirectory() as tmp:
                dst = Path(tmp) / CHECKPOINT_SUBDIR
                if src.exists():
                    import shutil

                    shutil.copytree(src, dst)
                    if rank == 0:
                        (dst / STATE_FILE).write_text(json.dumps({
                            "global_step": state.global_step,
                            "data_position_rows": state.global_step * config["global_batch_size"],
                            "world_size": config["world_size"], "losses": self.losses}))
                metrics = {"step": state.global_step, "total_steps": total_steps, "rank": rank,
                           "checkpoint_step": state.global_step}
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if src.exists() else None)

    class FailOnce(TrainerCallback):
        """Test hook: rank `fail_rank` raises once at step `fail_at_step` (a marker file records it)."""

        def on_step_end(self, args, state, control, **kw):
            marker = config.get("fail_marker")
            if (state.global_step == config.get("fail_at_step") and rank == config.get("fail_rank")
                    and marker and not os.path.exists(marker)):
                Path(marker).parent.mkdir(parents=True, exist_ok=True)
                Path(marker).write_text(f"rank {rank} failed at step {state.global_step}\n")
                raise RuntimeError(f"{FAIL_MESSAGE} at step {state.global_step} on rank {rank}")

    report = RayReport()
    callbacks = [report]
    if config.get("fail_at_step"):
        callbacks.append(FailOnce())
    return report, callbacks


def _sft_args(config: dict, node_plan: NodePlan, out_dir: str, fmt: str):
    from trl import SFTConfig

    sft = config["sft"]
    every = config.get("checkpoint_every_steps")
    zero3 = {}
    if node_plan.placement == "zero3":
        from rayquant.zero import zero3_config

        # DeepSpeed's engine replaces DDP; on CPU plans it runs on its CPU accelerator over gloo.
        zero3 = {"deepspeed": zero3_config(node_plan), "use_cpu": node_plan.gpu == CPU_DEVICE}
    return SFTConfig(**zero3,
        output_dir=out_dir, per_device_train_batch_size=node_plan.micro_batch_size,
        gradient_accumulation_steps=node_plan.gradient_accumulation_steps,
        max_steps=config["total_steps"], learning_rate=sft["learning_rate"],
        lr_scheduler_type=sft["lr_scheduler"], warmup_steps=sft["warmup_steps"],
        weight_decay=sft["weight_decay"], max_grad_norm=sft["max_grad_norm"],
        logging_steps=sft["logging_steps"], seed=sft["seed"], data_seed=sft["seed"],
        save_strategy="steps" if every else "no", save_steps=every or 500, save_total_limit=1,
        report_to=[], max_length=config["seq_len"], packing=False,
        bf16=node_plan.compute_dtype == "bfloat16", fp16=node_plan.compute_dtype == "float16",
        dataset_text_field="text", assistant_only_loss=fmt == "messages",
        average_tokens_across_devices=True, include_num_input_tokens_seen="no",
        ddp_find_unused_parameters=False, ddp_broadcast_buffers=False,
        dataloader_num_workers=0, disable_tqdm=True, log_level="warning",
    )


def make_sft_trainer(model, tokenizer, train_dataset, node_plan: NodePlan, config: dict, out_dir: str,
                     callbacks=(), args=None):
    """TRL's SFTTrainer over this rank's shard with the plan's settings and optimizer; returns
    (trainer, name of the optimizer class that runs). Also what the benchmark's direct run uses.
    `args`: the SFTConfig when already built (ZeRO-3 builds it before loading), else built here."""
    import torch
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    model_loss = node_plan.backend == "hf" and not torch.cuda.is_available()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, optimizer_used = build_optimizer(node_plan.optimizer, params, config["sft"]["learning_rate"],
                                                config["sft"]["weight_decay"])
    trainer = sharded_trainer_class(SFTTrainer, model_loss=model_loss)(
        model=model, processing_class=tokenizer, train_dataset=train_dataset,
        args=args if args is not None else _sft_args(config, node_plan, out_dir, config["format"]),
        optimizers=(optimizer, None), callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # the driver prints progress lines instead
    if node_plan.placement != "zero3":
        keep_adapters_fp32(params)
    return trainer, optimizer_used


def keep_adapters_fp32(params) -> None:
    """Undo TRL's downcast of the adapters of a 4-bit base to bf16 (SFTTrainer.__init__ does it for
    any `is_loaded_in_4bit` model, the QLoRA recipe) so that every rank trains fp32 adapters.

    Under heterogeneous DDP an NF4 rank and an FP8 (16-bit loaded) rank must hold the LoRA
    parameters in one dtype: DDP broadcasts and all-reduces them as flat buffers, and a bf16 buffer
    against an fp32 one is a size mismatch in gloo/NCCL. fp32 is PEFT's own adapter dtype
    (autocast_adapter_dtype) and what planner.memory counts (`_ADAPTER_BYTES = 4`); PEFT casts each
    LoRA layer's input to the adapters' dtype and its output back to the base's (peft/tuners/lora/
    layer.py and bnb.py, `_cast_input_dtype`), so the base's compute dtype is unchanged. Parameters
    are changed in place, so the optimizer built before the trainer keeps them. ZeRO-3 plans are left
    alone: DeepSpeed's engine holds the parameters in its own precision.
    """
    import torch

    for p in params:
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (TorchTrainer's train_loop_per_worker)."""
    import logging

    for key, value in config.get("env", {}).items():
        os.environ.setdefault(key, value)
    # Ray Train logs every report (the whole metrics dict) at INFO; the driver prints progress.
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)
    plan = TrainingPlan.from_dict(config["plan"])
    if plan.node_plans[0].backend == "unsloth":
        import unsloth  # noqa: F401  (must patch transformers/TRL before they are imported)
    import ray
    import ray.train
    import torch

    from rayquant.adapters import adapter_sha256
    from rayquant.data import shard_indices
    from rayquant.loading import load_for_training, quantized_module_counts

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != plan.num_workers:
        raise RuntimeError(f"Ray Train started {world} workers but the plan has {plan.num_workers}")
    assignment, node_plan = plan.for_rank(rank)
    from rayquant.placement import check_worker_placement

    check_worker_placement(config.get("label_selectors"), rank)  # before any weights load
    device = check_device(node_plan, rank)
    torch.manual_seed(config["sft"]["seed"])
    work = tempfile.mkdtemp(prefix=f"rayquant-rank{rank}-")
    zero3 = node_plan.placement == "zero3"
    args = None
    if zero3:
        if node_plan.gpu == CPU_DEVICE:
            # DeepSpeed picks CUDA whenever torch sees a GPU, even for a CPU plan.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Built before loading: the arguments hold transformers' ZeRO-3 config, which from_pretrained
        # reads (the ZeRO-3 + QLoRA recipe's order).
        args = _sft_args(config, node_plan, os.path.join(work, "hf"), config["format"])

    model, tokenizer, load_info = load_for_training(
        config["model_path"], node_plan, plan.job, device_map=device_map_for(node_plan),
        seed=config["sft"]["seed"])

    if not zero3:
        # DDP broadcasts every parameter and buffer from rank 0 at wrap time; the frozen base differs
        # between ranks with different quantization (and need not travel at all), so only the LoRA
        # parameters are synchronized.
        model._ddp_params_and_buffers_to_ignore = (
            [n for n, p in model.named_parameters() if not p.requires_grad]
            + [n for n, _ in model.named_buffers()])

    data = ray.get(config["data_ref"])
    per_rank = [plan.for_rank(r)[1].samples_per_step for r in range(world)]
    shard = data.select(shard_indices(len(data), per_rank, rank))

    report, callbacks = _callbacks(config, rank, config["total_steps"], node_plan)
    trainer, optimizer_used = make_sft_trainer(model, tokenizer, shard, node_plan, config,
                                               os.path.join(work, "hf"), callbacks, args=args)
    checkpoint = ray.train.get_checkpoint()
    resumed_from = None
    t0 = time.perf_counter()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state_file = Path(ckpt_dir) / CHECKPOINT_SUBDIR / STATE_FILE
            if not state_file.exists():
                raise RuntimeError(f"the checkpoint to resume from ({checkpoint.path}) holds the final "
                                   "adapters of a finished run, not a training state; start a new run "
                                   "(choose another run.name) or take the adapter from that run")
            state = json.loads(state_file.read_text())
            if state["world_size"] != world:
                raise RuntimeError(f"checkpoint was written by {state['world_size']} workers, this run has "
                                   f"{world}; start a new run (run.name) to change the worker count")
            resumed_from = state["global_step"]
            report.losses = [tuple(x) for x in state.get("losses", []) if x[0] <= resumed_from]
            output = trainer.train(resume_from_checkpoint=str(Path(ckpt_dir) / CHECKPOINT_SUBDIR))
    else:
        output = trainer.train()
    train_s = time.perf_counter() - t0

    final_root = Path(work) / "result"
    final = final_root / "final" / f"rank_{rank}"
    if zero3:
        from rayquant.zero import gathered_trainable_state_dict

        # Each rank holds a shard of every LoRA matrix: gather them so every rank saves the whole
        # adapter and the driver's hash check compares full adapters.
        trainer.model.save_pretrained(str(final), state_dict=gathered_trainable_state_dict(trainer.model))
    else:
        trainer.model.save_pretrained(str(final))
    peak, peak_source = peak_memory_bytes()
    stats = {
        "rank": rank, "node_type": assignment.node_type, "placement": node_plan.placement,
        "engine": type(trainer.model_wrapped).__name__, "node_index": assignment.node_index,
        "hostname": os.uname().nodename, "node_id": ray.get_runtime_context().get_node_id(),
        "device": device, "load": load_info,
        # Ranks of one DDP job may train on differently quantized bases (FP8 here, NF4 there): what
        # this rank's base held when training ended, next to what it loaded.
        "quantized_modules_after_training": quantized_module_counts(trainer.model),
        "adapter_dtype": str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad))
        .removeprefix("torch."),
        "optimizer_planned": node_plan.optimizer, "optimizer_used": optimizer_used,
        "micro_batch_size": node_plan.micro_batch_size,
        "gradient_accumulation_steps": node_plan.gradient_accumulation_steps,
        "shard_rows": len(shard), "global_steps": trainer.state.global_step, "resumed_from_step": resumed_from,
        "peak_memory_bytes": peak, "peak_memory_source": peak_source,
        "predicted_peak_memory_bytes": node_plan.peak_memory_bytes,
        "tokens": report.tokens, "train_s": train_s,
        "tokens_per_s": report.tokens / train_s if train_s > 0 else 0.0,
        "predicted_tokens_per_s": node_plan.tokens_per_second,
        "losses": report.losses, "train_loss": float(output.training_loss),
        "adapter_sha256": adapter_sha256(final),
    }
    (final / "worker_stats.json").write_text(json.dumps(stats, indent=2, default=str))
    from ray.train import Checkpoint

    ray.train.report({"step": trainer.state.global_step, "total_steps": config["total_steps"], "rank": rank,
                      "done": 1.0, "adapter_sha256": stats["adapter_sha256"]},
                     checkpoint=Checkpoint.from_directory(str(final_root)))
