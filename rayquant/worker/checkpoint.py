"""Training checkpoints through Ray Train, and resuming from them.

At each HF save every rank copies its `checkpoint-<step>/` under CHECKPOINT_SUBDIR/ and reports it;
rank 0 adds the run's state (STATE_FILE). Ray merges the ranks' directories into one checkpoint, so
ZeRO-3 ranks' shards all land in it, and a restarted worker group resumes from the latest one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

CHECKPOINT_SUBDIR = "checkpoint"
STATE_FILE = "rayquant_state.json"


@dataclass(frozen=True)
class CheckpointState:
    """What rank 0 records beside its HF checkpoint for the run that resumes from it."""

    global_step: int
    # Rows of the global batch order consumed so far (global_step x global batch). The resumed
    # trainer skips global_step x (micro-batch x accumulation) rows of each rank's shard (HF's
    # trainer state), which is this position only under the same global batch: `restored` checks it.
    data_position_rows: int
    world_size: int  # ZeRO-3 shards need as many workers to resume; DDP resumes on any number
    losses: tuple[tuple[int, float], ...]  # (step, loss) so far, so the manifest's curve spans restarts

    def __post_init__(self) -> None:
        object.__setattr__(self, "losses", tuple((int(s), float(v)) for s, v in self.losses))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, where: str) -> "CheckpointState":
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError) as e:
            raise RuntimeError(f"the checkpoint state {where} does not match this rayquant ({e}); start "
                               f"a new run (choose another run.name)") from None


def report_checkpoint(hf_checkpoint: Path, state: CheckpointState | None, metrics: Mapping[str, Any]) -> None:
    """Report `metrics` to Ray Train with this rank's HF checkpoint, plus `state` (rank 0's) beside
    it; with the metrics alone where the trainer wrote no checkpoint directory."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        if not hf_checkpoint.exists():
            ray.train.report(dict(metrics))
            return
        dst = Path(tmp) / CHECKPOINT_SUBDIR
        shutil.copytree(hf_checkpoint, dst)
        if state is not None:
            (dst / STATE_FILE).write_text(state.to_json())
        ray.train.report(dict(metrics), checkpoint=Checkpoint.from_directory(tmp))


@contextmanager
def restored(checkpoint, world_size: int, global_batch_size: int) -> Iterator[tuple[CheckpointState, str]]:
    """Open Ray's checkpoint to resume from: yields the run's state and the HF checkpoint directory
    for `trainer.train(resume_from_checkpoint=...)`, valid inside the `with` block.

    Refuses a checkpoint the resumed run would not continue exactly: written by another number of
    workers, at a data position that is not global_step global batches of this size, or missing a
    rank's RNG state (transformers saves rng_state_<rank>.pth per process and, without it, resumes
    with a fresh generator: dropout and any sampling would differ from the interrupted run)."""
    with checkpoint.as_directory() as ckpt_dir:
        state_file = Path(ckpt_dir) / CHECKPOINT_SUBDIR / STATE_FILE
        if not state_file.exists():
            raise RuntimeError(f"the checkpoint to resume from ({checkpoint.path}) holds the final "
                               "adapters of a finished run, not a training state; start a new run "
                               "(choose another run.name) or take the adapter from that run")
        state = CheckpointState.from_json(state_file.read_text(), f"of {checkpoint.path}")
        # A DDP checkpoint holds the whole adapter and optimizer (every rank's are the same), and the
        # data position is in global steps, which any split of the same global batch keeps: a run
        # re-planned onto fewer workers (a lost node) resumes from it. ZeRO-3's shards (DeepSpeed's
        # global_step*/ directory) are cut for one world size.
        hf_dir = Path(ckpt_dir) / CHECKPOINT_SUBDIR
        zero3 = any(hf_dir.glob("global_step*"))
        if state.world_size != world_size and zero3:
            raise RuntimeError(f"checkpoint holds ZeRO-3 shards of {state.world_size} workers, this run "
                               f"has {world_size}; start a new run (run.name) to change the worker count")
        if state.data_position_rows != state.global_step * global_batch_size:
            raise RuntimeError(f"the checkpoint of {checkpoint.path} stopped {state.data_position_rows} rows "
                               f"into the data, which is not {state.global_step} steps of {global_batch_size} "
                               "rows: it was written under another global batch; start a new run (run.name)")
        # The same workers resume where they stopped, each from its own RNG state (a re-planned
        # worker group is a new split of the work, whose ranks take what the files hold).
        same_workers = world_size > 1 and state.world_size == world_size
        missing = [r for r in range(world_size) if same_workers and not (hf_dir / f"rng_state_{r}.pth").exists()]
        if missing:
            raise RuntimeError(f"the checkpoint of {checkpoint.path} lacks the RNG state of rank(s) "
                               f"{', '.join(map(str, missing))}; resuming would not continue the run it "
                               "interrupted. Start a new run (run.name)")
        yield state, str(hf_dir)
