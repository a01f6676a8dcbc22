"""The model a job names: a local config.json (or model directory), else a catalog id.

    load_model_spec("meta-llama/Llama-3.1-8B")   # the catalog (planner.catalog_models)
    load_model_spec("./my-model")                # a directory holding config.json

The ModelSpec it returns is planner.architecture's; the catalog's rows go through the same parser.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from planner.architecture import ModelConfigError, ModelSpec
from planner.catalog_models import catalog_ids, catalog_spec
from planner.plan import PlanError


class UnknownModelError(PlanError):
    """A model name is neither a local config path nor a catalog id."""


def load_model_spec(name_or_path: str) -> ModelSpec:
    """A path to a config.json or model directory, else a catalog id (case-insensitive, org optional)."""
    text = str(name_or_path).strip()
    p = Path(text).expanduser()
    if p.is_file() or (p.is_dir() and (p / "config.json").is_file()):
        return ModelSpec.from_config(p, name=text)
    if p.is_dir():
        raise ModelConfigError(f"{p} is a directory without config.json. To fix: pass the model "
                               "directory that holds config.json.")
    spec = catalog_spec(text)
    if spec is not None:
        return spec
    ids = catalog_ids()
    close = difflib.get_close_matches(text.lower(), [i.lower() for i in ids], n=3, cutoff=0.3)
    lower_to_id = {i.lower(): i for i in ids}
    hint = ", ".join(lower_to_id[c] for c in close) or "none"
    raise UnknownModelError(f"unknown model {text!r}: not a local config.json path and not in the "
                            f"catalog. Closest catalog ids: {hint}. To fix: pass a path to the "
                            "model's config.json (or its directory), or see `rayquant models`.")
