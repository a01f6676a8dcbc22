"""The models rayquant takes: where to read a model's config (to plan) and its weights (to train).

A model is a catalog id (`meta-llama/Llama-3.1-8B`, planned from the built-in catalog), any other
Hugging Face Hub id (`org/name`, resolved through `huggingface_hub`: its cache, HF_TOKEN,
HF_HUB_OFFLINE), a local config.json or model directory, or one of the offline tiny models
`rayquant/tiny-llama` / `rayquant/tiny-qwen2` (a real architecture with random weights, built into
the cache on first use; nothing is downloaded).

What each step reads, and where:
- planning (`plan`, `estimate`, `k8s`, `train`'s plan): only the config (`config_path`; a Hub id
  not in the catalog downloads its config.json alone);
- the driver's checks before Ray starts (`check_model`): the config and the tokenizer, and that
  the weights can be had (in the cache when offline, listed on the Hub when online);
- each training worker, on its own node: the weights and tokenizer (`resolve_model`).
A gated repo, a missing one, and an offline machine without the files in its cache each raise
ModelUnavailableError, saying which and what to do. Light at import.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from planner.model import UnknownModelError

TINY_MODEL_PREFIX = "rayquant/tiny-"
TINY_VOCAB_SIZE = 256  # rayquant.tiny.train_tokenizer's vocab_size


# A Hugging Face repo id: `name` or `org/name`, each part letters, digits, `.`, `_`, `-` (Hub rules:
# at most 96 characters, no `--` or `..`). Data files and configs are paths, never ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".yaml", ".yml", ".arrow", ".safetensors")
# What a worker fetches of a Hub model: config, tokenizer and safetensors weights (a repo that has
# only PyTorch .bin weights gets those instead); never other formats (GGUF, `original/` checkpoints).
_CONFIG_AND_TOKENIZER = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja", "tokenizer*"]
_WEIGHT_PATTERNS = (["*.safetensors"], ["*.bin"])
_IGNORED = ["original/*", "*.gguf", "*.pth", "*.pt", "*.h5", "*.msgpack", "*.onnx"]


class ModelUnavailableError(UnknownModelError):
    """A Hub model that cannot be had here: gated, missing (or private), or not in the cache of an
    offline machine. The message says which and how to fix it."""


def looks_like_hub_id(text: object) -> bool:
    """Whether `text` has the shape of a Hub repo id (`org/name` or `name`), not of a file path."""
    return (isinstance(text, str) and len(text) <= 96 and bool(_HUB_ID.match(text))
            and "--" not in text and ".." not in text and not text.lower().endswith(_FILE_SUFFIXES))


def hub_cache_dir() -> str:
    """The Hub cache, read from the environment now (huggingface_hub reads it once, at import):
    HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    explicit = os.environ.get("HF_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    return os.path.join(os.path.expanduser(os.environ.get("HF_HOME", "~/.cache/huggingface")), "hub")


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# Hub repos that are gated: the Hub serves their files only to an account that accepted the
# owner's terms, with that account's token. Meta's Llama, Google's Gemma and Mistral AI's models
# (every catalog model of those orgs) are; for any other repo the Hub's metadata says it.
GATED_REPOS = (re.compile(r"^meta-llama/", re.IGNORECASE),
               re.compile(r"^google/(gemma|codegemma|recurrentgemma|paligemma|shieldgemma)", re.IGNORECASE),
               re.compile(r"^mistralai/", re.IGNORECASE))


def hub_gated(model: str) -> bool | None:
    """Whether the Hub gates `model`: from GATED_REPOS, else (a Hub id outside the catalog) the
    Hub's model_info; None when that cannot be asked (offline, or the Hub did not answer). Local
    paths and tiny models are not gated."""
    if not is_hub_model(model):
        return False
    if any(p.match(model) for p in GATED_REPOS):
        return True
    if is_catalog_id(model):
        return False
    if hub_offline():
        return None
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(model, timeout=10)
    except Exception:  # no network, a private repo, a Hub error: unknown, the pods will say
        return None
    return bool(info.gated)


def is_catalog_id(model: str) -> bool:
    from planner.catalog_models import catalog_spec

    return catalog_spec(model) is not None


def is_hub_model(model: str) -> bool:
    """A model read through huggingface_hub: an id (catalog or not) that is not a local path or a
    tiny model."""
    return tiny_arch(model) is None and not os.path.exists(os.path.expanduser(model)) and looks_like_hub_id(model)


def hub_error(error: BaseException, repo_id: str, what: str = "model") -> str | None:
    """A user's account of why `repo_id` could not be had from the Hub, from the error
    huggingface_hub (or transformers/datasets around it) raised; None when it is not a Hub error."""
    from huggingface_hub import errors

    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    url = f"https://huggingface.co/{'datasets/' if what == 'dataset' else ''}{repo_id}"
    token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "no HF_TOKEN is set"
    gated = (f"the {what} {repo_id} is gated on the Hub ({token}). To fix: accept its terms at "
             f"{url} with your account, then set HF_TOKEN to a token of that account")
    missing = (f"the {what} {repo_id} is not on the Hub, or is private ({token}). To fix: check the "
               f"id at {url}; for a private repo set HF_TOKEN to a token that can read it")
    for e in chain:  # GatedRepoError first: it is a RepositoryNotFoundError too
        if isinstance(e, errors.GatedRepoError):
            return gated
    for e in chain:
        if isinstance(e, errors.RepositoryNotFoundError):
            return missing
        # datasets re-raises the Hub's errors as its DatasetNotFoundError, the cause dropped
        if type(e).__name__ == "DatasetNotFoundError":
            return gated if "gated" in str(e) else missing
        if isinstance(e, errors.RevisionNotFoundError):
            return f"the {what} {repo_id} has no such revision. To fix: check the id at {url}"
        if isinstance(e, errors.HfHubHTTPError) and getattr(e.response, "status_code", None) == 401:
            return (f"the Hub refused access to the {what} {repo_id} ({token}). To fix: set HF_TOKEN to a "
                    f"token that can read {url}")
    for e in chain:
        if isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError)):
            if hub_offline():
                return (f"the {what} {repo_id} is not in the local Hub cache ({_cache_of(what)}) and "
                        f"HF_HUB_OFFLINE is set. To fix: download it once on a machine online "
                        f"(`hf download {'--repo-type dataset ' if what == 'dataset' else ''}{repo_id}`) "
                        "into that cache, or unset HF_HUB_OFFLINE")
            return (f"the {what} {repo_id} could not be fetched from the Hub and is not in the local cache "
                    f"({_cache_of(what)}): {type(e).__name__}: {e}. To fix: check the network "
                    "(HF_ENDPOINT, a proxy), or download it once into that cache")
        if isinstance(e, errors.EntryNotFoundError):
            return (f"the {what} {repo_id} lacks a file rayquant needs ({e}). To fix: use a transformers "
                    f"model repo (config.json, tokenizer, weights)")
    return None


def _cache_of(what: str) -> str:
    """The cache a Hub repo is looked up in: datasets keep their own (HF_DATASETS_CACHE)."""
    if what == "dataset":
        import datasets

        return str(datasets.config.HF_DATASETS_CACHE)
    return hub_cache_dir()


def _hub_call(repo_id: str, call, what: str = "model"):
    """call(), with huggingface_hub's errors said as ModelUnavailableError."""
    try:
        return call()
    except Exception as e:  # classified below; anything else is not a Hub error and propagates
        reason = hub_error(e, repo_id, what)
        if reason is None:
            raise
        raise ModelUnavailableError(reason) from None


def hub_file(repo_id: str, filename: str) -> str:
    """The local path of one file of a Hub model (the cache's copy, downloaded if need be)."""
    from huggingface_hub import hf_hub_download

    return _hub_call(repo_id, lambda: hf_hub_download(repo_id, filename, cache_dir=hub_cache_dir()))


def _weight_files(folder: str | os.PathLike) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.suffix in (".safetensors", ".bin") and not p.name.startswith("training_args"))


def hub_snapshot(repo_id: str, weights: bool) -> str:
    """A local directory with a Hub model's config and tokenizer, and (weights=True) its weights:
    safetensors, else PyTorch .bin. Raises ModelUnavailableError."""
    from huggingface_hub import snapshot_download

    def fetch(patterns):
        return _hub_call(repo_id, lambda: snapshot_download(
            repo_id, cache_dir=hub_cache_dir(), allow_patterns=patterns, ignore_patterns=_IGNORED))

    folder = fetch(_CONFIG_AND_TOKENIZER)
    if not weights:
        return folder
    for patterns in _WEIGHT_PATTERNS:
        folder = fetch(_CONFIG_AND_TOKENIZER + patterns)
        if _weight_files(folder):
            return folder
    raise ModelUnavailableError(
        f"the model {repo_id} has no weights {'in the local Hub cache (' + hub_cache_dir() + '; HF_HUB_OFFLINE is set)' if hub_offline() else 'on the Hub'}"
        f" (*.safetensors or *.bin). To fix: "
        + (f"download it once online (`hf download {repo_id}`) into that cache"
           if hub_offline() else "use a transformers model repo"))


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
    """A local directory with `model`'s weights and tokenizer: tiny ids are built offline into the
    cache (once), Hub ids fetched into (or found in) the Hub cache; local paths as they are.
    What each worker calls on its own node. Raises ModelUnavailableError."""
    arch = tiny_arch(model)
    if arch is not None:
        from rayquant.tiny import make_tiny_model

        return str(make_tiny_model(cache_dir() / "models" / f"tiny-{arch}", arch=arch))
    if is_hub_model(model):
        return hub_snapshot(model, weights=True)
    return os.path.expanduser(model)


def resolve_tokenizer(model: str) -> str:
    """A local directory with `model`'s tokenizer, fetching no weights: a tiny model's tokenizer is
    trained into the cache (the one make_tiny_model trains: the training is deterministic), a Hub
    model's tokenizer files fetched. Raises ModelUnavailableError."""
    arch = tiny_arch(model)
    if arch is not None:
        built = cache_dir() / "models" / f"tiny-{arch}"
        if (built / "tokenizer.json").exists():
            return str(built)
        from rayquant.tiny import train_tokenizer

        out = cache_dir() / "tokenizers" / "tiny"
        if not (out / "tokenizer.json").exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tiny-tokenizer.", dir=out.parent))
            train_tokenizer(tmp)
            try:
                os.replace(tmp, out)
            except OSError:  # another process finished first: keep theirs
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return str(out)
    if is_hub_model(model):
        return hub_snapshot(model, weights=False)
    path = Path(os.path.expanduser(model))
    return str(path.parent if path.is_file() else path)


def context_length(config: Mapping[str, Any]) -> int | None:
    """The longest sequence a model was built for, from its config (None when it does not say)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = text.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class ModelCheck:
    """What the driver found about a model before Ray starts (check_model)."""

    model: str
    source: str  # "tiny", "local" or "hub"
    tokenizer_dir: str  # a local directory AutoTokenizer loads
    context_length: int | None  # from the config; None when it does not say
    weights: str  # where the workers will find the weights, in words


def check_model(model: str) -> ModelCheck:
    """Check on the driver that `model`'s config, tokenizer and weights can be had, as the workers
    will need them (fetching config and tokenizer, never the weights). Raises ModelUnavailableError
    (or planner.model.UnknownModelError) with the reason and a fix."""
    arch = tiny_arch(model)
    if arch is not None:
        problems = model_problems(model)
        if problems:
            raise UnknownModelError(problems[0])
        from rayquant.tiny import TINY_CONFIGS

        return ModelCheck(model, "tiny", resolve_tokenizer(model), context_length(TINY_CONFIGS[arch]),
                          "built offline on each node (random weights)")
    if not is_hub_model(model):
        path = Path(os.path.expanduser(model))
        folder = path.parent if path.is_file() else path
        if not (folder / "config.json").is_file():
            raise UnknownModelError(f"{model} is not a model directory (no config.json). To fix: point "
                                    "{model} at a transformers model directory, or use a Hub id")
        if not _weight_files(folder):
            raise UnknownModelError(f"{folder} holds no weights (*.safetensors or *.bin), which training "
                                    "loads. To fix: point {model} at the directory with the weights")
        config = json.loads((folder / "config.json").read_text())
        return ModelCheck(model, "local", str(folder), context_length(config),
                          f"read from {folder} (the same path on every node)")
    tokenizer_dir = hub_snapshot(model, weights=False)
    config = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    if hub_offline():
        # An offline snapshot is the cached commit's folder: the weights are there if cached at all.
        if not _weight_files(tokenizer_dir):
            raise ModelUnavailableError(
                f"the model {model} has no weights in the local Hub cache ({hub_cache_dir()}) and "
                f"HF_HUB_OFFLINE is set (its config and tokenizer are there). To fix: download it once "
                f"online (`hf download {model}`) into that cache, or unset HF_HUB_OFFLINE")
        where = f"read from the local Hub cache ({hub_cache_dir()} on each node; HF_HUB_OFFLINE is set)"
    else:
        from huggingface_hub import HfApi

        info = _hub_call(model, lambda: HfApi().model_info(model, files_metadata=False))
        names = [s.rfilename for s in (info.siblings or [])]
        if not any(n.endswith((".safetensors", ".bin")) and "/" not in n for n in names):
            raise ModelUnavailableError(f"the model {model} has no weights on the Hub (*.safetensors or "
                                        "*.bin). To fix: use a transformers model repo")
        where = "downloaded from the Hub by each node into its Hub cache"
    return ModelCheck(model, "hub", tokenizer_dir, context_length(config), where)


def _cached_weights(repo_id: str, patterns: list[str]) -> bool:
    """Whether the Hub cache holds `repo_id`'s weights matching `patterns` (offline, no download)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, cache_dir=hub_cache_dir(), allow_patterns=patterns,
                                   local_files_only=True)
    except Exception as e:  # not cached at all
        if hub_error(e, repo_id) is None:
            raise
        return False
    return bool(_weight_files(folder))


def config_path(model: str) -> str:
    """What planner.model.load_model_spec reads for `model`, without building any weights: a tiny
    id's config (the built model's, else its config written to a temporary directory), otherwise
    `model` itself (a catalog id or a local config/directory). An unknown tiny id raises
    planner.model.UnknownModelError."""
    arch = tiny_arch(model)
    if arch is None:
        if is_hub_model(model) and not is_catalog_id(model):
            return hub_file(model, "config.json")
        return model
    problems = model_problems(model)
    if problems:
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
