"""Adapter hashing, the cross-rank agreement check, the manifest and atomic output."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from planner.atomic import OutputExistsError
from rayquant.adapters import (MANIFEST, AdapterMismatchError, adapter_sha256, build_manifest, gather,
                               is_adapter_output, loss_summary, write_adapter_dir)
from rayquant.contract import WORKER_STATS_FILE, DeviceInfo, QuantizationReport, WorkerStats


def _adapter(d, scale=1.0, metadata=None):
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 8, generator=g) * scale,
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(8, 4, generator=g) * scale}
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata=metadata)
    (d / "adapter_config.json").write_text('{"r": 4}')
    return d


def _stats(rank: int, sha: str) -> WorkerStats:
    return WorkerStats(
        rank=rank, node_type="CPU:a", hostname="h", node_id="n", device=DeviceInfo("cpu", "CPU", cpus=2),
        placement="per-gpu", engine="DistributedDataParallel",
        quantization=QuantizationReport("nf4", "nf4", {"linear4bit_modules": 14},
                                        {"linear4bit": 14, "fp8_rowwise": 0}),
        optimizer_planned="adamw_8bit", optimizer_used="bitsandbytes.optim.AdamW8bit", micro_batch_size=2,
        gradient_accumulation_steps=2, shard_rows=108, global_steps=2, resumed_from_step=None,
        trainable_parameters=4096, adapter_dtype="float32", peak_memory_bytes=2**28,
        peak_memory_source="peak RSS (ru_maxrss)", predicted_peak_memory_bytes=2**30, train_s=1.5,
        tokens_per_s=100.0, predicted_tokens_per_s=500.0, losses=((1, 2.0), (2, 1.5)), adapter_sha256=sha)


def _rank_dir(root, rank, scale=1.0):
    d = _adapter(root / "final" / f"rank_{rank}", scale)
    (d / WORKER_STATS_FILE).write_text(_stats(rank, adapter_sha256(d)).to_json())
    return d


def test_hash_depends_on_weights_not_metadata(tmp_path):
    a = adapter_sha256(_adapter(tmp_path / "a", metadata={"format": "pt"}))
    b = adapter_sha256(_adapter(tmp_path / "b", metadata={"format": "pt", "note": "other"}))
    c = adapter_sha256(_adapter(tmp_path / "c", scale=1.0001))
    assert a == b != c and len(a) == 64


def test_gather_accepts_equal_ranks(tmp_path):
    for r in range(2):
        _rank_dir(tmp_path, r)
    g = gather(tmp_path, 2)
    assert g.adapter_dir == tmp_path / "final" / "rank_0"
    assert [s.rank for s in g.worker_stats] == [0, 1] and g.sha256 == adapter_sha256(g.adapter_dir)


def test_gather_refuses_stats_of_another_rayquant_version(tmp_path):
    d = _rank_dir(tmp_path, 0)
    stats = json.loads((d / WORKER_STATS_FILE).read_text())
    stats["rows"] = stats.pop("shard_rows")  # a worker that renamed a field
    (d / WORKER_STATS_FILE).write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="WorkerStats of rank 0 .*missing field.*shard_rows.*unknown field.*rows"):
        gather(tmp_path, 1)


def test_manifest_shows_each_worker_measured_next_to_planned(tmp_path):
    for r in range(2):
        _rank_dir(tmp_path, r)
    m = build_manifest({"version": 1}, gather(tmp_path, 2), {"run": {"steps": 2}})
    assert m["plan"] == {"version": 1} and m["run"] == {"steps": 2}
    assert m["adapter_sha256"] == m["workers"][0]["adapter_sha256"]
    assert m["workers"][1] == {
        "rank": 1, "node_type": "CPU:a", "hostname": "h", "node_id": "n",
        "device": {"device": "cpu", "name": "CPU", "cpus": 2}, "placement": "per-gpu",
        "engine": "DistributedDataParallel",
        "quantization": {"planned": "nf4", "used": "nf4", "linear4bit_modules": 14,
                         "modules_after_training": {"linear4bit": 14, "fp8_rowwise": 0}},
        "optimizer": {"planned": "adamw_8bit", "used": "bitsandbytes.optim.AdamW8bit"},
        "micro_batch_size": 2, "gradient_accumulation_steps": 2, "shard_rows": 108, "steps": 2,
        "resumed_from_step": None,
        "peak_memory_bytes": {"measured": 2**28, "source": "peak RSS (ru_maxrss)", "predicted": 2**30},
        "tokens_per_s": {"measured": 100.0, "predicted": 500.0}, "train_s": 1.5,
        "trainable_parameters": 4096, "adapter_dtype": "float32", "adapter_sha256": m["adapter_sha256"]}
    assert m["loss"]["points"] == 2 and m["loss"]["curve"] == [[1, 2.0], [2, 1.5]]


def test_gather_fails_loudly_on_mismatch_or_missing_rank(tmp_path):
    _rank_dir(tmp_path, 0)
    _rank_dir(tmp_path, 1, scale=2.0)
    with pytest.raises(AdapterMismatchError, match="different adapters.*rank 0.*rank 1"):
        gather(tmp_path, 2)
    with pytest.raises(AdapterMismatchError, match=r"ranks \[2\] returned no adapter"):
        gather(tmp_path, 3)


def _manifest(dest):
    m = json.loads((dest / MANIFEST).read_text())
    assert m["written_by"] == "rayquant" and MANIFEST not in m["files"]
    return {k: v for k, v in m.items() if k not in ("written_by", "files")}


def test_write_adapter_dir_replaces_only_when_complete(tmp_path):
    src = _adapter(tmp_path / "src")
    dest = tmp_path / "out" / "adapter"
    write_adapter_dir(src, {"v": 1}, dest)
    assert _manifest(dest) == {"v": 1}
    assert adapter_sha256(dest) == adapter_sha256(src)
    # A failure while writing (here: the source vanished) leaves the previous output untouched.
    with pytest.raises(FileNotFoundError):
        write_adapter_dir(tmp_path / "gone", {"v": 2}, dest, overwrite=True)
    assert _manifest(dest) == {"v": 1}
    write_adapter_dir(src, {"v": 3}, dest, overwrite=True)
    assert _manifest(dest) == {"v": 3}
    assert sorted(os.listdir(dest.parent)) == ["adapter"]  # no temporary or old copies left
    # Readable like any new directory (the temporary one it was written into starts 0700).
    mask = os.umask(0)
    os.umask(mask)
    assert (dest.stat().st_mode & 0o777) == 0o777 & ~mask
    assert ((dest / MANIFEST).stat().st_mode & 0o777) == 0o666 & ~mask


def test_write_adapter_dir_never_replaces_a_users_folder(tmp_path):
    # The reported data loss: `-o proj` moved proj/ aside and deleted it, with proj/src/main.py.
    src = _adapter(tmp_path / "src")
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("x\n")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match=r"not written by rayquant \(it holds src/\)"):
            write_adapter_dir(src, {"v": 1}, proj, overwrite=overwrite)
    assert (proj / "src" / "main.py").read_text() == "x\n"
    assert sorted(os.listdir(tmp_path)) == ["proj", "src"]  # nothing half-written beside it
    # A file where the directory should go is refused too; an empty directory is used.
    (tmp_path / "file").write_text("keep")
    with pytest.raises(OutputExistsError, match="is a file"):
        write_adapter_dir(src, {"v": 1}, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    write_adapter_dir(src, {"v": 1}, tmp_path / "empty")
    assert _manifest(tmp_path / "empty") == {"v": 1}


def test_a_previous_adapter_is_replaced_only_with_overwrite_and_only_if_untouched(tmp_path):
    src = _adapter(tmp_path / "src")
    dest = tmp_path / "adapter"
    write_adapter_dir(src, {"v": 1}, dest)
    assert is_adapter_output(dest)
    with pytest.raises(OutputExistsError, match="previous adapter directory written by rayquant.*add overwrite"):
        write_adapter_dir(src, {"v": 2}, dest)
    assert _manifest(dest) == {"v": 1}
    # The user added a file of their own: the folder is no longer only ours, so it is kept.
    (dest / "notes.txt").write_text("mine")
    assert not is_adapter_output(dest)
    with pytest.raises(OutputExistsError, match="not written by rayquant"):
        write_adapter_dir(src, {"v": 2}, dest, overwrite=True)
    assert (dest / "notes.txt").read_text() == "mine" and _manifest(dest) == {"v": 1}


def test_loss_summary():
    curve = [(s, 5.0 - 0.1 * s) for s in range(1, 31)]
    s = loss_summary(curve)
    assert s["first"] == pytest.approx(4.9) and s["last"] == pytest.approx(2.0)
    assert s["last_fifth_mean"] < s["first_fifth_mean"]
    assert s["curve"][0] == [1, pytest.approx(4.9)] and s["curve"][-1] == [30, pytest.approx(2.0)]
    assert loss_summary([]) == {"points": 0}
