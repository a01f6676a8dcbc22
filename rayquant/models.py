"""The models rayquant takes: where to read a model's config (to plan) and its weights (to train).

A model is a catalog or hub id (`meta-llama/Llama-3.1-8B`), a local config.json or model directory,
or one of the offline tiny models `rayquant/tiny-llama` / `rayquant/tiny-qwen2` (a real architecture
with random weights, built into the cache on first use; nothing is downloaded). Planning reads only
configs (`config_path`); training needs weights (`resolve_model`). Light at import.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

TINY_MODEL_PREFIX = "rayquant/tiny-"
TINY_VOCAB_SIZE = 256  # rayquant.tiny.train_tokenizer's vocab_size


def cache_dir() -> Path:
    """Where built tiny models live: $RAYQUANT_CACHE, else ~/.cache/rayquant."""
    return Path(os.environ.get("RAYQUANT_CACHE", "~/.cache/rayquant")).expanduser()


def tiny_arch(model: str) -> str | None:
    """'rayquant/tiny-llama' -> 'llama'; None for any other model id."""
    return model[len(TINY_MODEL_PREFIX):] if model.startswith(TINY_MODEL_PREFIX) else None


def model_problems(model: object) -> list[str]:
    """What is wrong with `model` as a model reference (empty when nothing is); settings are named
    as {placeholders} (planner.vocab)."""
    if model is None or model == "":
        return ["{model} is required: a hub id, a local directory or rayquant/tiny-llama"]
    if not isinstance(model, str):
        return [f"{{model}} must be a hub id, a local directory or rayquant/tiny-llama, got {model!r}"]
    arch = tiny_arch(model)
    if arch is not None:
        from rayquant.tiny import TINY_CONFIGS

        if arch not in TINY_CONFIGS:
            return [f"{{model}} {model!r}: tiny models are "
                    f"{', '.join(TINY_MODEL_PREFIX + a for a in TINY_CONFIGS)}"]
    return []


def resolve_model(model: str) -> str:
    """A local directory (or hub id) with `model`'s weights: tiny ids are built offline into the
    cache (once); local paths and hub ids are returned as they are, for from_pretrained."""
    arch = tiny_arch(model)
    if arch is not None:
        from rayquant.tiny import make_tiny_model

        return str(make_tiny_model(cache_dir() / "models" / f"tiny-{arch}", arch=arch))
    return model


def config_path(model: str) -> str:
    """What planner.model.load_model_spec reads for `model`, without building any weights: a tiny
    id's config (the built model's, else its config written to a temporary directory), otherwise
    `model` itself (a catalog id or a local config/directory). An unknown tiny id raises
    planner.model.UnknownModelError."""
    arch = tiny_arch(model)
    if arch is None:
        return model
    problems = model_problems(model)
    if problems:
        from planner.model import UnknownModelError

        raise UnknownModelError(problems[0] + ". To fix: use one of them, or a catalog id "
                                "(`rayquant models`)")
    built = cache_dir() / "models" / f"tiny-{arch}"
    if (built / "config.json").exists():
        return str(built)
    from rayquant.tiny import TINY_CONFIGS

    cfg = dict(TINY_CONFIGS[arch], vocab_size=TINY_VOCAB_SIZE, torch_dtype="bfloat16")
    tmp = Path(tempfile.mkdtemp(prefix="rayquant-tiny-config-")) / f"tiny-{arch}"
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(cfg))
    return str(tmp)
