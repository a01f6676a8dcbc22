"""TrainerCallbacks the fault and exactness tests hand to the workers' SFTTrainer: they observe
training (the rows each forward sees, step 1's gradients) or end a worker process for real.

RayQuantTrainer(callbacks=...) sends them to Ray Train workers pickled by value (they live in the
tests folder, which the workers do not import).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from transformers import TrainerCallback


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


class RowLog(TrainerCallback):
    """Append, for every training forward, the step it belongs to and its rows' token ids (padding
    taken off by the attention mask) to `<folder>/rows-rank<r>.jsonl`, one line per micro-batch,
    flushed at once (a process killed next loses nothing it trained). Each process tags its lines
    with its pid, so the attempts of a restarted run can be told apart.

    A forward pre-hook sees what is trained, not what the data loader prefetched."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.step = 0
        self.handle = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.step = state.global_step
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        path = Path(self.folder) / f"rows-rank{_rank()}.jsonl"

        def hook(module, args_, kwargs):
            if not module.training:
                return
            ids = kwargs.get("input_ids", args_[0] if args_ else None)
            mask = kwargs.get("attention_mask")
            rows = [[int(t) for t, keep in zip(r.tolist(), (m.tolist() if mask is not None else [1] * len(r)))
                     if keep] for r, m in zip(ids, mask if mask is not None else ids)]
            with open(path, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "step": self.step + 1, "rows": rows}) + "\n")
                f.flush()
                os.fsync(f.fileno())

        self.handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_step_end(self, args, state, control, **kw):
        self.step = state.global_step

    def on_train_end(self, args, state, control, **kw):
        if self.handle is not None:
            self.handle.remove()


class Threads(TrainerCallback):
    """Write the torch threads this rank trains with, and the OMP_NUM_THREADS Ray gave it, to
    `<folder>/threads-rank<r>.json` when training begins."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_begin(self, args, state, control, **kw):
        import torch

        Path(self.folder).mkdir(parents=True, exist_ok=True)
        (Path(self.folder) / f"threads-rank{_rank()}.json").write_text(json.dumps(
            {"torch": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}))


class KillOnce(TrainerCallback):
    """SIGKILL this process after optimizer step `step` on rank `rank`, once per run: the marker
    file says it happened, so the restarted worker trains on.

    It strikes when the step's metrics are logged, after rayquant's own callback reported them:
    Ray Train keeps one unconsumed report per worker (a queue of one), so by then the controller
    has taken every report before it, the last checkpoint included. A kill right after a checkpoint
    report can lose that checkpoint (the run then resumes from the one before, still correctly),
    which would not test resuming from it."""

    def __init__(self, step: int, rank: int, marker: str, run_dir: str | None = None,
                 checkpoint_step: int = 0) -> None:
        self.at, self.rank, self.marker = step, rank, marker
        self.run_dir, self.checkpoint_step = run_dir, checkpoint_step

    def on_log(self, args, state, control, **kw):
        marker = Path(self.marker)
        if state.global_step == self.at and _rank() == self.rank and not marker.exists():
            if self.run_dir is not None:
                # The queue of one is not always enough (seen under ZeRO-3): wait until the driver
                # registered `checkpoint_step` (rayquant.restarts reads what Ray Train registered).
                from rayquant.restarts import last_checkpoint_step

                for _ in range(600):
                    if last_checkpoint_step(Path(self.run_dir)) >= self.checkpoint_step:
                        break
                    time.sleep(0.1)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"rank": self.rank, "step": state.global_step, "pid": os.getpid(),
                                          "time": time.time()}))
            os.kill(os.getpid(), signal.SIGKILL)


class StepOneGradients(TrainerCallback):
    """The trainable parameters' gradients at step 1's optimizer step (after DDP's all-reduce,
    before the optimizer), by parameter name without DDP's `module.` prefix."""

    grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None:
            self.grads = {n.replace("module.", "", 1): p.grad.detach().clone()
                          for n, p in model.named_parameters() if p.requires_grad}


def unique_alpaca(src, dst) -> str:
    """`src`'s alpaca rows, each made unique by its number (the row logs identify rows by their
    tokens; tiny_alpaca repeats some rows). Returns `dst` as a string."""
    with open(src) as f, open(dst, "w") as out:
        for i, line in enumerate(f.read().splitlines()):
            row = json.loads(line)
            row["instruction"] = f"{row['instruction']} (row {i})"
            out.write(json.dumps(row) + "\n")
    return str(dst)


def trajectory(folder, rank: int, row_ids) -> tuple[dict[int, list[list[int]]], list[int]]:
    """What `rank` trained, attempts stitched as a resumed run is: for each step, the row ids of its
    micro-batches in the last attempt that trained it (an attempt killed mid-run is rolled back to
    the checkpoint the next one resumes from); and each attempt's first step. `row_ids` maps a
    row's token tuple to its id."""
    steps: dict[int, list[list[int]]] = {}
    first: list[int] = []
    for attempt, step, rows in trained_rows(folder, rank):
        if attempt == len(first):
            first.append(step)
            for later in [s for s in steps if s >= step]:
                del steps[later]
        steps.setdefault(step, []).append([row_ids[tuple(r)] for r in rows])
    return steps, first


def trained_rows(folder, rank: int) -> list[tuple[int, int, list[list[int]]]]:
    """(attempt number from 0, step, rows) for each micro-batch `rank` trained, in order."""
    lines = [json.loads(x) for x in (Path(folder) / f"rows-rank{rank}.jsonl").read_text().splitlines()]
    pids = list(dict.fromkeys(x["pid"] for x in lines))
    return [(pids.index(x["pid"]), x["step"], x["rows"]) for x in lines]


def assert_same_training(resumed, reference) -> None:
    """The resumed run's adapter is the uninterrupted run's, tensor for tensor, and so is its loss
    curve (two TrainResults)."""
    from safetensors.torch import load_file

    assert resumed.manifest["adapter_sha256"] == reference.manifest["adapter_sha256"]
    a = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(reference.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert resumed.manifest["loss"]["curve"] == reference.manifest["loss"]["curve"]


def free_port() -> int:
    """A TCP port free on this machine now (torchrun's --master_port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
