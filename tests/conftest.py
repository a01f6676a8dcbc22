"""Shared fixtures: tiny real-architecture models built once per session (nothing downloaded)."""

from __future__ import annotations

import os

import pytest

# Keep the CPU runs quiet and offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from rayquant.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    from rayquant.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2")


# -- a Hugging Face Hub cache laid out as huggingface_hub writes it (nothing downloaded) -------------

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_repo(cache, repo_id: str, files, repo_type: str = "model", commit: str = FAKE_COMMIT):
    """Put `files` ({relative path: bytes or a Path to copy}) into the Hub cache `cache` as
    huggingface_hub's downloads leave them: <type>s--<org>--<name>/refs/main (the commit),
    blobs/<sha256> and snapshots/<commit>/<path> symlinks to the blobs. Returns the snapshot dir."""
    import hashlib
    from pathlib import Path

    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for rel, content in files.items():
        data = Path(content).read_bytes() if isinstance(content, Path) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        dst = repo / "snapshots" / commit / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(os.path.relpath(blob, dst.parent))
    return repo / "snapshots" / commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache for this test (HF_HUB_CACHE, which rayquant reads at each call)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_tokenizer_files(tmp_path_factory):
    """The tiny models' tokenizer files ({name: Path})."""
    from rayquant.tiny import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out)
    return {p.name: p for p in out.iterdir() if p.is_file()}
