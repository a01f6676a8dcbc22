"""TRL's SFTTrainer as every rank builds it: the plan's settings, the plan's optimizer, this rank's
shard read in order, and losses and metrics that stay correct when ranks take different numbers of
micro-steps (see the package docstring for why each piece is needed).

The rows arrive tokenized (rayquant.tokens, on the driver): input_ids and labels, cut at seq_len,
and with packing, packed rows with their sequence lengths. TRL's own preparation is skipped
(`skip_prepare_dataset`), so every rank trains on exactly the rows the driver checked; packed
batches are collated padding-free (TRL's collator: position_ids restart at each sequence, no
attention mask, no loss on a sequence's first token), which transformers' attention turns into a
block-diagonal mask, so packed sequences never attend to each other. Evaluation is
rayquant.worker.evaluation's (token-weighted over all ranks, one collective)."""

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

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            evaluation = self.rayquant_evaluation
            loss, tokens = evaluation.loss(self)
            metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_tokens": tokens}
            was_training = self.model.training
            self.model.eval()  # TRL's log files these as eval metrics only in eval mode
            try:
                self.log(dict(metrics))
            finally:
                self.model.train(was_training)
            evaluation.after(self, self.state.global_step, loss, tokens)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
            # TRL/Unsloth gather metrics across ranks inside every micro-step; with unequal
            # accumulation those collectives would pair up wrongly, so keep them rank-local.
            self.accelerator.gather_for_metrics = _local_gather
            try:
                if model_loss:
                    if model.training:  # TRL's num_tokens metric, rank-local
                        # padded batches: the mask's ones; padding-free (packed) ones: every position
                        mask = inputs.get("attention_mask")
                        self._total_train_tokens += int(mask.sum() if mask is not None
                                                        else inputs["input_ids"].numel())
                        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
                    # No KV cache: transformers finds packed sequences in position_ids only without
                    # one (masking_utils), and a training forward needs none.
                    return Trainer.compute_loss(self, model, dict(inputs, use_cache=False),
                                                return_outputs=return_outputs,
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
        zero3 = {"deepspeed": zero3_config(node_plan)}
    return SFTConfig(**zero3,
        # CPU plans: without use_cpu accelerate finds no device backend and trains each rank alone
        # (DistributedType.NO: no DDP, no all-reduce, no token count across ranks), although the
        # process group is up. Unsloth's CPU trainer sets it itself; the hf backend needs it here.
        use_cpu=node_plan.gpu == CPU_DEVICE,
        output_dir=out_dir, per_device_train_batch_size=node_plan.micro_batch_size,
        per_device_eval_batch_size=node_plan.micro_batch_size,
        gradient_accumulation_steps=node_plan.gradient_accumulation_steps,
        max_steps=settings.max_steps, learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler, warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
        logging_steps=settings.logging_steps, seed=settings.seed, data_seed=settings.seed,
        save_strategy="steps" if every else "no", save_steps=every or 500, save_total_limit=1,
        eval_strategy="steps" if settings.eval_steps else "no", eval_steps=settings.eval_steps,
        prediction_loss_only=True,
        report_to=list(settings.report_to), run_name=settings.run_name,
        # Tokenized (and packed) on the driver: TRL prepares nothing, packs nothing.
        dataset_kwargs={"skip_prepare_dataset": True}, max_length=settings.seq_len, packing=False,
        bf16=node_plan.compute_dtype == "bfloat16", fp16=node_plan.compute_dtype == "float16",
        average_tokens_across_devices=True, include_num_input_tokens_seen="no",
        ddp_find_unused_parameters=False, ddp_broadcast_buffers=False,
        dataloader_num_workers=0, disable_tqdm=True, log_level="warning",
    )


def make_sft_trainer(model, tokenizer, train_dataset, node_plan: NodePlan, settings: SftSettings,
                     out_dir: str, callbacks=(), args=None, evaluation=None):
    """TRL's SFTTrainer over this rank's shard of tokenized rows (rayquant.tokens) with the plan's
    settings and optimizer; returns (trainer, name of the optimizer class that runs). Also what the
    benchmark's direct run uses. `args`: the SFTConfig when already built (ZeRO-3 builds it before
    loading), else built here. `evaluation`: this rank's rayquant.worker.evaluation.Evaluation
    when the run evaluates; the trainer's `rayquant_guard.stopped` says why training stopped early."""
    import torch
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from rayquant.worker.evaluation import evaluation_callbacks

    model_loss = node_plan.backend == "hf" and not torch.cuda.is_available()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, optimizer_used = build_optimizer(node_plan.optimizer, params, settings.learning_rate,
                                                settings.weight_decay)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Given explicitly: Unsloth's CPU defaults turn SFTConfig's padding_free off (its CPU attention
    # would mix packed sequences; transformers' SDPA mask keeps them apart when there is no KV cache,
    # and TRL's and Unsloth's loss both run the forward without one).
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=settings.packing)
    guard, guards = evaluation_callbacks(evaluation, settings.eval_steps, settings.max_steps)
    trainer = sharded_trainer_class(SFTTrainer, model_loss=model_loss)(
        model=model, processing_class=tokenizer, train_dataset=train_dataset,
        eval_dataset=evaluation.rows if evaluation is not None else None,
        args=args if args is not None else sft_args(settings, node_plan, out_dir),
        data_collator=collator, optimizers=(optimizer, None), callbacks=[*callbacks, *guards])
    trainer.rayquant_evaluation = evaluation
    trainer.rayquant_guard = guard
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
