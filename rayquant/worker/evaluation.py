"""Evaluation on every rank: the eval loss as a token-weighted mean over all ranks' eval rows, with
exactly one collective per evaluation; the best adapter kept; training stopped on a non-finite loss.

Why not transformers' evaluation loop: it gathers every batch's loss across ranks (a collective per
batch), so ranks with different eval shard sizes or batch sizes issue different numbers of
collectives and hang, and it averages per-batch means, which weighs a batch of a few tokens like
one of thousands. Here each rank sums its rows' token losses and counts their tokens, and one
all-reduce of [loss sum, token count] gives the mean over every eval token of the run.

The eval rows are cut into one contiguous slice per rank (`eval_slice`). Under ZeRO-3 the forward
passes themselves gather parameters collectively, so there every rank runs the same number of
batches (`eval_batches`): a rank with fewer rows runs its last ones as extra forwards that count
no tokens.

Evaluations happen on every rank at the same steps (global_step is equal on all ranks): every
`eval_steps` steps and always at the last step, inside training, so trackers still have their run
open. Their results are equal on every rank, so the decisions taken from them (keep this adapter as
the best, stop on a non-finite loss) are the same everywhere.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Sequence

IGNORE = -100


def eval_slice(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s contiguous slice of the eval rows (sizes differ by at most one)."""
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def eval_batches(num_rows: int, micro_batch_sizes: Sequence[int], rank: int, same_count: bool) -> int:
    """Batches `rank` runs per evaluation: its own slice's, or (same_count, for ZeRO-3) the most
    any rank needs."""
    def needed(r: int) -> int:
        start, stop = eval_slice(num_rows, len(micro_batch_sizes), r)
        return math.ceil((stop - start) / micro_batch_sizes[r])

    return max(needed(r) for r in range(len(micro_batch_sizes))) if same_count else needed(rank)


def save_adapter(trainer, directory: str | Path, zero3: bool) -> None:
    """Save the trainer's LoRA adapter to `directory` (ZeRO-3: every rank gathers the full adapter
    first, a collective, so every rank must call this together)."""
    if zero3:
        from rayquant.zero import gathered_trainable_state_dict

        trainer.model.save_pretrained(str(directory), state_dict=gathered_trainable_state_dict(trainer.model))
    else:
        trainer.model.save_pretrained(str(directory))


class Evaluation:
    """One rank's evaluations: its eval rows, the curve, the best adapter so far."""

    def __init__(self, rows, num_batches: int, batch_size: int, pad_token_id: int, *,
                 keep_best: bool = False, best_dir: str | Path | None = None, zero3: bool = False,
                 spare_row=None) -> None:
        self.rows = rows  # this rank's slice (datasets.Dataset of input_ids, labels)
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.keep_best = keep_best
        self.best_dir = Path(best_dir) if best_dir is not None else None
        self.zero3 = zero3
        self.spare_row = spare_row  # a row to forward when this slice has none left (ZeRO-3)
        self.curve: list[tuple[int, float]] = []
        self.tokens = 0
        self.best: tuple[int, float] | None = None  # (step, loss) of the adapter in best_dir

    def _batch(self, b: int):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        collate = DataCollatorForLanguageModeling(pad_token_id=self.pad_token_id)
        start = b * self.batch_size
        stop = min(start + self.batch_size, len(self.rows))
        if start < stop:
            return collate([self.rows[i] for i in range(start, stop)]), True
        spare = self.rows[len(self.rows) - 1] if len(self.rows) else self.spare_row
        return collate([spare]), False

    def loss(self, trainer) -> tuple[float, int]:
        """(token-weighted eval loss over every rank, eval tokens over every rank)."""
        import torch
        import torch.distributed as dist

        model = trainer.model
        was_training = model.training
        model.eval()
        device = trainer.args.device
        total = torch.zeros(2, dtype=torch.float64, device=device)
        try:
            with torch.no_grad():
                for b in range(self.num_batches):
                    batch, counts = self._batch(b)
                    batch = {k: v.to(device) for k, v in batch.items()}
                    if not counts:  # ZeRO-3's extra forward: its collectives, no tokens
                        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False)
                        continue
                    # With num_items_in_batch the model's loss is the token-loss *sum* divided by it
                    # (transformers' ForCausalLMLoss; Unsloth's loss honours it too): 1 gives the sum,
                    # over the shifted labels, without materializing float logits here.
                    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                labels=batch["labels"], num_items_in_batch=1, use_cache=False)
                    total[0] += out.loss.detach().double()
                    total[1] += (batch["labels"][:, 1:] != IGNORE).sum()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(total)  # the one collective of this evaluation
        finally:
            model.train(was_training)
        tokens = int(total[1].item())
        return (total[0] / max(tokens, 1)).item() if tokens else float("nan"), tokens

    def after(self, trainer, step: int, loss: float, tokens: int) -> None:
        """Record an evaluation; with keep_best, save the adapter when its loss is the best yet."""
        self.curve.append((step, loss))
        self.tokens = tokens
        if self.keep_best and math.isfinite(loss) and (self.best is None or loss < self.best[1]):
            if self.best_dir.exists():
                shutil.rmtree(self.best_dir)
            save_adapter(trainer, self.best_dir, self.zero3)
            self.best = (step, loss)


def evaluation_callbacks(evaluation: Evaluation | None, eval_steps: int | None, max_steps: int):
    """TrainerCallbacks: stop training on a non-finite logged loss (the logged loss is averaged
    over ranks, so every rank stops at the same step), and evaluate at the last step when the eval
    schedule would miss it. The stop's reason is on the returned guard's `stopped`."""
    from transformers import TrainerCallback

    class StopOnNonFiniteLoss(TrainerCallback):
        stopped: str | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if isinstance(loss, (int, float)) and not math.isfinite(loss):
                self.stopped = (f"the training loss was {loss} at step {state.global_step}: stopped "
                                "there (a step with no trainable token, or diverging updates)")
                control.should_training_stop = True

    class EvaluateAtTheEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= max_steps and (eval_steps is None or state.global_step % eval_steps):
                control.should_evaluate = True

    guard = StopOnNonFiniteLoss()
    return guard, ([guard] + ([EvaluateAtTheEnd()] if evaluation is not None else []))
