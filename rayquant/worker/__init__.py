"""The Ray Train worker: find this rank's settings in the plan, check the device, load, train, and
report a WorkerStats with the adapter.

    device.py           the device checked against the node plan; device map; peak memory
    optimizer.py        the plan's optimizer
    sft.py              TRL's SFTTrainer over this rank's shard (arguments, sharded trainer class)
    callbacks.py        progress and checkpoints reported to Ray Train
    checkpoint.py       checkpoint contents (rank 0's CheckpointState) and resuming from them
    oom.py              an out-of-memory error turned into the report the driver re-plans from

Importing this package loads neither torch nor transformers: Ray imports it for the
worker_process_setup_hook (import_unsloth_first), which must run before transformers is imported.

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
  micro-steps, so TRL's metric gathers run rank-locally and DDP does not broadcast buffers;
- on CPU plans the SFTConfig says use_cpu, without which accelerate finds no device backend and
  trains every rank alone (no DDP at all) although Ray Train set up the process group.
tests/test_exact_gradients.py checks the result: step 1's all-reduced LoRA gradient of ranks with
different micro-batches, accumulation and token counts equals the single-process gradient of the
token mean over the global batch to float32 rounding (relative 1e-7), where plain per-rank
averaging is 30% off.

Ranks may also load different bases (FP8 on one node type, dynamic 4-bit on another): DDP ignores
every frozen parameter and buffer, so only the LoRA parameters are broadcast and all-reduced, and
every rank keeps them in fp32 (sft.keep_adapters_fp32) so their buffers match whatever the base.

ZeRO-3 node plans (rayquant.zero) take DeepSpeed's engine instead of DDP: the SFTConfig with the
DeepSpeed config is built before the model loads, the ranks share one micro-batch x accumulation,
and every rank all-gathers the LoRA shards before saving, so all ranks hold the same whole adapter.
Checkpoints carry every rank's ZeRO shard (Ray merges the ranks' directories), so a restarted
worker group resumes from them as DDP runs do.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from planner.hardware import CPU_DEVICE
from rayquant.contract import WORKER_STATS_FILE, WorkerConfig, WorkerStats

__all__ = ["import_unsloth_first", "train_loop_per_worker"]


def import_unsloth_first() -> None:
    """Ray worker_process_setup_hook: Unsloth patches transformers/TRL only when imported before
    them, and Ray's worker start-up may import transformers before the train loop runs. The
    known library noise is filtered first (rayquant.quiet)."""
    from rayquant import quiet

    quiet.install_worker()
    if os.environ.get("RAYQUANT_BACKEND", "unsloth") == "unsloth":
        import unsloth  # noqa: F401


def train_loop_per_worker(config: WorkerConfig, dataset_ref, model_path: str, eval_ref=None,
                          callbacks=()) -> None:
    """Train this rank as `config` says on its shard of the dataset behind `dataset_ref` (a Ray
    object reference to tokenized rows, rayquant.tokens), loading the base from `model_path` (this
    node's copy of config.model); with `eval_ref`, evaluate on its slice of those eval rows.
    `callbacks`: the user's transformers TrainerCallbacks (RayQuantTrainer(callbacks=...)), added
    to this rank's SFTTrainer."""
    import logging

    plan = config.plan
    if plan.node_plans[0].backend == "unsloth":
        import unsloth  # noqa: F401  (must patch transformers/TRL before they are imported)
    import ray
    import ray.train
    import torch

    # Ray sets OMP_NUM_THREADS to the worker's CPUs when the task starts, after the process-setup
    # hook has imported torch (through unsloth) with every core: without this each CPU worker runs
    # a thread per core, and two workers on two cores train 3-4x slower (benchmarks/bench_trainer.py).
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    from rayquant.adapters import adapter_sha256
    from rayquant.data import shard_indices
    from rayquant.loading import load_for_training, quantization_report, quantized_module_counts
    from rayquant.placement import check_worker_placement
    from rayquant.worker.callbacks import ray_report
    from rayquant.worker.checkpoint import restored
    from rayquant.worker.device import check_device, device_map_for, peak_memory_bytes
    from rayquant.worker.evaluation import Evaluation, eval_batches, eval_slice, save_adapter
    from rayquant.worker.sft import make_sft_trainer, sft_args

    # Ray Train logs every report at INFO on every rank, which drowns the driver's progress lines.
    # Its logger is named after the module's file (ray 2.60: logging.getLogger(__file__)).
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != plan.num_workers:
        raise RuntimeError(f"Ray Train started {world} workers but the plan has {plan.num_workers}")
    assignment, node_plan = plan.for_rank(rank)
    check_worker_placement(config.label_selectors, rank)  # before any weights load
    device = check_device(node_plan, rank)
    settings = config.sft
    if settings.report_to:  # an integration whose package this image lacks is skipped, said once
        import dataclasses

        from rayquant.tracking import available

        usable, skipped = available(settings.report_to)
        if rank == 0:
            for message in skipped:
                print(f"[rayquant] {message}", flush=True)
        settings = dataclasses.replace(settings, report_to=usable)
    torch.manual_seed(settings.seed)
    work = tempfile.mkdtemp(prefix=f"rayquant-rank{rank}-")
    zero3 = node_plan.placement == "zero3"
    args = None
    if zero3:
        if node_plan.gpu == CPU_DEVICE:
            # DeepSpeed picks CUDA whenever torch sees a GPU, even for a CPU plan.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Built before loading: the arguments hold transformers' ZeRO-3 config, which from_pretrained
        # reads (the ZeRO-3 + QLoRA recipe's order).
        args = sft_args(settings, node_plan, os.path.join(work, "hf"))

    model, tokenizer, load_info = load_for_training(
        model_path, node_plan, plan.job, device_map=device_map_for(node_plan), seed=settings.seed)

    if not zero3:
        # DDP broadcasts every parameter and buffer from rank 0 at wrap time; the frozen base differs
        # between ranks with different quantization (and need not travel at all), so only the LoRA
        # parameters are synchronized.
        model._ddp_params_and_buffers_to_ignore = (
            [n for n, p in model.named_parameters() if not p.requires_grad]
            + [n for n, _ in model.named_buffers()])

    data = ray.get(dataset_ref)
    per_rank = [plan.for_rank(r)[1].samples_per_step for r in range(world)]
    shard = data.select(shard_indices(len(data), per_rank, rank))

    evaluation = None
    if settings.evaluate:
        eval_rows = ray.get(eval_ref)
        start, stop = eval_slice(len(eval_rows), world, rank)
        micro = [plan.for_rank(r)[1].micro_batch_size for r in range(world)]
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        evaluation = Evaluation(eval_rows.select(range(start, stop)),
                                eval_batches(len(eval_rows), micro, rank, same_count=zero3),
                                node_plan.micro_batch_size, tokenizer.pad_token_id,
                                keep_best=settings.keep_best, best_dir=Path(work) / "best", zero3=zero3,
                                spare_row=eval_rows[0])

    report = ray_report(rank, node_plan, settings.max_steps, world, plan.global_batch_size)
    extra = []
    if settings.report_to:
        from rayquant.tracking import run_params_callback

        extra.append(run_params_callback(plan.to_dict(), config.run_config))
    trainer, optimizer_used = make_sft_trainer(model, tokenizer, shard, node_plan, settings,
                                               os.path.join(work, "hf"),
                                               [report, *extra, *callbacks], args=args,
                                               evaluation=evaluation)
    for callback in extra:
        callback.handler = trainer.callback_handler
    checkpoint = ray.train.get_checkpoint()
    resumed_from = None
    t0 = time.perf_counter()
    if checkpoint is not None:
        with restored(checkpoint, world, plan.global_batch_size) as (state, hf_checkpoint):
            resumed_from = state.global_step
            report.losses = [x for x in state.losses if x[0] <= resumed_from]
            trainer.train(resume_from_checkpoint=hf_checkpoint)
    else:
        trainer.train()
    train_s = time.perf_counter() - t0
    if settings.report_to:
        from rayquant.tracking import finish_runs

        finish_runs(settings.report_to)

    final_root = Path(work) / "result"
    final = final_root / "final" / f"rank_{rank}"
    adapter_step = trainer.state.global_step
    if evaluation is not None and evaluation.best is not None:  # keep_best: the best eval's adapter
        import shutil

        shutil.copytree(evaluation.best_dir, final)
        adapter_step = evaluation.best[0]
    else:
        # ZeRO-3: each rank holds a shard of every LoRA matrix; save_adapter gathers them so every
        # rank saves the whole adapter and the driver's hash check compares full adapters.
        save_adapter(trainer, final, zero3)
    peak, peak_source = peak_memory_bytes()
    stats = WorkerStats(
        rank=rank, node_type=assignment.node_type, hostname=os.uname().nodename,
        node_id=ray.get_runtime_context().get_node_id(), device=device, placement=node_plan.placement,
        engine=type(trainer.model_wrapped).__name__,
        # Ranks of one DDP job may train on differently quantized bases (FP8 here, NF4 there): what
        # this rank's base held when training ended, next to what it loaded.
        quantization=quantization_report(load_info, quantized_module_counts(trainer.model)),
        optimizer_planned=node_plan.optimizer, optimizer_used=optimizer_used,
        micro_batch_size=node_plan.micro_batch_size,
        gradient_accumulation_steps=node_plan.gradient_accumulation_steps,
        shard_rows=len(shard), global_steps=trainer.state.global_step, resumed_from_step=resumed_from,
        trainable_parameters=load_info["trainable_parameters"],
        adapter_dtype=str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad))
        .removeprefix("torch."),
        peak_memory_bytes=peak, peak_memory_source=peak_source,
        predicted_peak_memory_bytes=node_plan.peak_memory_bytes,
        train_s=train_s, tokens_per_s=report.tokens / train_s if train_s > 0 else 0.0,
        predicted_tokens_per_s=node_plan.tokens_per_second,
        losses=tuple(report.losses), adapter_sha256=adapter_sha256(final),
        eval_losses=tuple(evaluation.curve) if evaluation is not None else (),
        eval_tokens=evaluation.tokens if evaluation is not None else 0,
        adapter_step=adapter_step, stopped=trainer.rayquant_guard.stopped)
    (final / WORKER_STATS_FILE).write_text(stats.to_json())
    from ray.train import Checkpoint

    ray.train.report({"step": trainer.state.global_step, "total_steps": settings.max_steps, "rank": rank,
                      "done": 1.0, "adapter_sha256": stats.adapter_sha256},
                     checkpoint=Checkpoint.from_directory(str(final_root)))
