"""TRL's SFTTrainer as every rank builds it: the plan's settings, the plan's optimizer, this rank's
shard read in order, and losses and metrics that stay correct when ranks take different numbers of
micro-steps (see the package docstring for why each piece is needed)."""

from __future__ import annotations

from planner.hardware import CPU_DEVICE
from planner.plan import NodePlan
from rayquant.contract import SftSettings
from rayquant.worker.optimizer import build_optimizer


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


def sft_args(settings: SftSettings, node_plan: NodePlan, out_dir: str):
    """TRL's SFTConfig for this rank: the run's settings with its node plan's batch shape, dtype,
    and (zero3 plans) DeepSpeed config."""
    from trl import SFTConfig

    every = settings.checkpoint_every_steps
    zero3 = {}
    if node_plan.placement == "zero3":
        from rayquant.zero import zero3_config

        # DeepSpeed's engine replaces DDP; on CPU plans it runs on its CPU accelerator over gloo.
        zero3 = {"deepspeed": zero3_config(node_plan), "use_cpu": node_plan.gpu == CPU_DEVICE}
    return SFTConfig(**zero3,
        output_dir=out_dir, per_device_train_batch_size=node_plan.micro_batch_size,
        gradient_accumulation_steps=node_plan.gradient_accumulation_steps,
        max_steps=settings.max_steps, learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler, warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
        logging_steps=settings.logging_steps, seed=settings.seed, data_seed=settings.seed,
        save_strategy="steps" if every else "no", save_steps=every or 500, save_total_limit=1,
        report_to=[], max_length=settings.seq_len, packing=False,
        bf16=node_plan.compute_dtype == "bfloat16", fp16=node_plan.compute_dtype == "float16",
        dataset_text_field="text", assistant_only_loss=settings.dataset_format == "messages",
        average_tokens_across_devices=True, include_num_input_tokens_seen="no",
        ddp_find_unused_parameters=False, ddp_broadcast_buffers=False,
        dataloader_num_workers=0, disable_tqdm=True, log_level="warning",
    )


def make_sft_trainer(model, tokenizer, train_dataset, node_plan: NodePlan, settings: SftSettings,
                     out_dir: str, callbacks=(), args=None):
    """TRL's SFTTrainer over this rank's shard with the plan's settings and optimizer; returns
    (trainer, name of the optimizer class that runs). Also what the benchmark's direct run uses.
    `args`: the SFTConfig when already built (ZeRO-3 builds it before loading), else built here."""
    import torch
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    model_loss = node_plan.backend == "hf" and not torch.cuda.is_available()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, optimizer_used = build_optimizer(node_plan.optimizer, params, settings.learning_rate,
                                                settings.weight_decay)
    trainer = sharded_trainer_class(SFTTrainer, model_loss=model_loss)(
        model=model, processing_class=tokenizer, train_dataset=train_dataset,
        args=args if args is not None else sft_args(settings, node_plan, out_dir),
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
    (autocast_adapter_dtype) and what planner.memory.trainable counts (`_ADAPTER_BYTES = 4`); PEFT casts each
    LoRA layer's input to the adapters' dtype and its output back to the base's (peft/tuners/lora/
    layer.py and bnb.py, `_cast_input_dtype`), so the base's compute dtype is unchanged. Parameters
    are changed in place, so the optimizer built before the trainer keeps them. ZeRO-3 plans are left
    alone: DeepSpeed's engine holds the parameters in its own precision.
    """
    import torch

    for p in params:
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
