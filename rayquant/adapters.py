"""Adapters gathered from the ranks: hash, verify they agree, and write one PEFT adapter directory
plus manifest.json atomically (a temporary sibling renamed into place)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from planner.atomic import check_output, publish_dir
from rayquant.contract import WORKER_STATS_FILE, WorkerStats

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MANIFEST = "manifest.json"


class AdapterMismatchError(RuntimeError):
    """Ranks finished DDP with different adapters: the all-reduce did not keep them in step."""


def adapter_sha256(adapter_dir: str | os.PathLike) -> str:
    """SHA-256 over the adapter's tensors (name, dtype, shape, bytes, in name order): equal for
    equal weights whatever the file's metadata."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class GatheredAdapters:
    adapter_dir: Path  # rank 0's adapter (all ranks' are identical)
    worker_stats: tuple[WorkerStats, ...]  # one per rank, by rank
    sha256: str


def gather(result_dir: str | os.PathLike, world_size: int) -> GatheredAdapters:
    """Read final/rank_<r>/ for every rank from the merged Ray checkpoint; hashes must agree."""
    root = Path(result_dir) / "final"
    stats, hashes, missing = [], {}, []
    for rank in range(world_size):
        d = root / f"rank_{rank}"
        if not (d / ADAPTER_WEIGHTS).exists():
            missing.append(rank)
            continue
        s = WorkerStats.from_json((d / WORKER_STATS_FILE).read_text())
        recomputed = adapter_sha256(d)
        if recomputed != s.adapter_sha256:
            raise AdapterMismatchError(f"rank {rank}'s adapter changed after it was hashed "
                                       f"({s.adapter_sha256[:12]} -> {recomputed[:12]}): storage is corrupt")
        hashes[rank] = recomputed
        stats.append(s)
    if missing:
        raise AdapterMismatchError(f"ranks {missing} returned no adapter (expected final/rank_<r>/ in "
                                   f"{result_dir}); the run did not finish on every worker")
    if len(set(hashes.values())) != 1:
        detail = ", ".join(f"rank {r}: {h[:12]}" for r, h in hashes.items())
        raise AdapterMismatchError(f"ranks ended with different adapters ({detail}). Under DDP every rank "
                                   f"applies the same averaged update, so this is a bug or a non-deterministic "
                                   f"optimizer; the run's output was not written.")
    return GatheredAdapters(adapter_dir=root / "rank_0", worker_stats=tuple(stats), sha256=hashes[0])


def loss_summary(losses: list[tuple[int, float]]) -> dict[str, Any]:
    """First, last, min and a few evenly spaced points of the (step, loss) curve."""
    if not losses:
        return {"points": 0}
    values = [v for _, v in losses]
    k = max(1, len(losses) // 10)
    head = values[: max(1, len(values) // 5)]
    tail = values[-max(1, len(values) // 5):]
    return {"points": len(losses), "first": values[0], "last": values[-1], "min": min(values),
            "first_fifth_mean": sum(head) / len(head), "last_fifth_mean": sum(tail) / len(tail),
            "curve": [[s, v] for s, v in losses[::k]] + ([list(losses[-1])] if (len(losses) - 1) % k else [])}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("rayquant", "ray", "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes",
                 "unsloth", "unsloth_zoo", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def build_manifest(plan_dict: Mapping[str, Any], gathered: GatheredAdapters, extra: Mapping[str, Any]) -> dict:
    """The manifest: the plan; per worker, measured next to predicted; loss summary; versions; hashes."""
    workers = []
    for s in gathered.worker_stats:
        workers.append({
            "rank": s.rank, "node_type": s.node_type, "hostname": s.hostname,
            "node_id": s.node_id, "device": s.device.to_dict(),
            "placement": s.placement, "engine": s.engine,
            "quantization": s.quantization.to_manifest(),
            "optimizer": {"planned": s.optimizer_planned, "used": s.optimizer_used},
            "micro_batch_size": s.micro_batch_size,
            "gradient_accumulation_steps": s.gradient_accumulation_steps,
            "shard_rows": s.shard_rows, "steps": s.global_steps, "resumed_from_step": s.resumed_from_step,
            "peak_memory_bytes": {"measured": s.peak_memory_bytes, "source": s.peak_memory_source,
                                  "predicted": s.predicted_peak_memory_bytes},
            "tokens_per_s": {"measured": s.tokens_per_s, "predicted": s.predicted_tokens_per_s},
            "train_s": s.train_s,
            "trainable_parameters": s.trainable_parameters,
            "adapter_dtype": s.adapter_dtype,
            "adapter_sha256": s.adapter_sha256,
        })
    manifest = {"format": 1, "plan": dict(plan_dict), "adapter_sha256": gathered.sha256, "workers": workers,
                "loss": loss_summary(list(gathered.worker_stats[0].losses)),
                "versions": versions(), **dict(extra)}
    evaluation = eval_summary(gathered.worker_stats[0])
    if evaluation is not None:
        manifest["eval"] = evaluation
    return manifest


def eval_summary(stats: WorkerStats) -> dict[str, Any] | None:
    """The manifest's `eval`: the (step, loss) curve of every evaluation (token-weighted over all
    ranks, so rank 0's is every rank's), the last loss, the best, and which adapter was kept."""
    if not stats.eval_losses:
        return None
    curve = [[s, v] for s, v in stats.eval_losses]
    best = min(stats.eval_losses, key=lambda x: (x[1] != x[1], x[1]))  # NaN last
    kept = "best" if stats.adapter_step is not None and stats.adapter_step != stats.global_steps else "last"
    return {"curve": curve, "last": curve[-1][1], "best": {"step": best[0], "loss": best[1]},
            "tokens": stats.eval_tokens, "adapter": kept, "adapter_step": stats.adapter_step}


def is_adapter_output(path: str | os.PathLike) -> bool:
    """True for a directory rayquant wrote with write_adapter_dir and nobody added to since: its
    manifest says rayquant wrote it and lists every file the directory holds."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("written_by") != "rayquant":
        return False
    allowed = set(manifest.get("files") or ()) | {MANIFEST}
    return {p.name for p in path.iterdir()} <= allowed


def check_adapter_output(dest: str | os.PathLike, overwrite: bool) -> None:
    """Refuse `dest` for the adapter unless it is new, empty, or (with overwrite) a previous adapter
    directory of rayquant's; raises planner.atomic.OutputExistsError."""
    check_output(dest, overwrite=overwrite, what="adapter directory", directory=True,
                 ours=is_adapter_output)


def write_adapter_dir(adapter_src: str | os.PathLike, manifest: Mapping[str, Any],
                      dest: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Copy the adapter and write manifest.json into a temporary sibling of `dest`, then rename it
    into place. `dest` must be new or empty, or (with `overwrite`) a previous adapter directory
    rayquant wrote: a user's folder is never replaced (check_adapter_output). A replaced adapter is
    swapped out only after the new one is complete."""
    dest = Path(dest).expanduser().resolve()
    check_adapter_output(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        files = sorted(name for name in os.listdir(adapter_src) if name != WORKER_STATS_FILE)
        for name in files:
            shutil.copy2(Path(adapter_src) / name, tmp / name)
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump({"written_by": "rayquant", "files": files, **manifest}, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        publish_dir(tmp, dest)  # dest: empty, or a previous adapter of ours (checked above)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
