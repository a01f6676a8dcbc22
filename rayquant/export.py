"""A trained LoRA adapter merged into a 16-bit copy of its base: a standard transformers model
directory (config, safetensors weights, generation config, tokenizer) that loads with
`AutoModelForCausalLM.from_pretrained` and serves without PEFT.

    from rayquant.export import export_merged
    info = export_merged("runs/quickstart/adapter", "merged", dtype="bf16")

How: the base is loaded in 16-bit whatever the run trained on (merging into NF4 or FP8 weights
would bake their quantization error in, and Unsloth cannot merge into 4-bit on CPU), PEFT applies
the adapter, and `merge_and_unload(safe_merge=True)` folds it in (refusing NaNs). Before merging,
the logits of base + adapter are taken on a few tokens; after, the merged model's on the same
tokens must match within the dtype's rounding (`TOLERANCE`), else nothing is written. The output
carries `rayquant_export.json`: the adapter's SHA-256 (the one its manifest records), the base,
the dtype and the check's figures. It is written into a temporary sibling and renamed into place;
a folder rayquant did not write is never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from planner.atomic import check_output, publish_dir
from planner.vocab import SettingError

EXPORT_MANIFEST = "rayquant_export.json"
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
# Largest |merged - (base + adapter)| logit difference allowed, relative to the largest |logit|:
# the merged weight W + BA is rounded to the dtype once (bf16 keeps 8 mantissa bits, fp16 11),
# while the unmerged forward adds the fp32 adapter's output to the 16-bit base's.
TOLERANCE = {"bf16": 5e-2, "fp16": 1e-2}
CHECK_TEXT = "The quick brown fox jumps over the lazy dog. What is a LoRA adapter, and how is it merged?"
CHECK_TOKENS = 16


class ExportError(SettingError):
    """The adapter directory or the output cannot be used (exit 2, with a fix)."""


class ExportCheckError(RuntimeError):
    """The merged model's logits do not match base + adapter: nothing was written."""


def _is_export(path: str | os.PathLike) -> bool:
    try:
        return json.loads((Path(path) / EXPORT_MANIFEST).read_text()).get("written_by") == "rayquant"
    except (OSError, ValueError, AttributeError):
        return False


def adapter_base(adapter_dir: Path) -> str:
    """The base model of a rayquant adapter: the model its manifest's plan names (as the user named
    it: a catalog or Hub id, a path, a tiny id), else PEFT's base_model_name_or_path."""
    manifest = adapter_dir / "manifest.json"
    if manifest.exists():
        try:
            model = json.loads(manifest.read_text())["plan"]["model"]
            if isinstance(model, str) and model:
                return model
        except (ValueError, KeyError, TypeError):
            pass
    try:
        return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{adapter_dir} names no base model ({e}). To fix: pass --base MODEL") from None


def _check_adapter_dir(adapter_dir: Path) -> None:
    missing = [n for n in ("adapter_config.json", "adapter_model.safetensors") if not (adapter_dir / n).is_file()]
    if missing:
        raise ExportError(f"{adapter_dir} is not a LoRA adapter directory (no {', '.join(missing)}). "
                          "To fix: pass the adapter directory `rayquant train` wrote (its path is printed "
                          "at the end of the run; <run.storage_path>/<run.name>/adapter by default)")


def export_merged(adapter_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bf16",
                  base: str | None = None, overwrite: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Merge the adapter in `adapter_dir` into a `dtype` (bf16 | fp16) copy of its base and write a
    transformers model directory with the tokenizer to `out`. Returns what rayquant_export.json
    holds. Raises ExportError (bad input), planner.atomic.OutputExistsError, ModelUnavailableError,
    or ExportCheckError (the merged logits do not match: nothing written)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayquant.adapters import adapter_sha256
    from rayquant.models import resolve_model

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}. To fix: pick one")
    adapter_dir = Path(adapter_dir).expanduser().resolve()
    _check_adapter_dir(adapter_dir)
    out = Path(out).expanduser().resolve()
    check_output(out, overwrite=overwrite, what="merged model directory", directory=True, ours=_is_export)
    model = base or adapter_base(adapter_dir)
    base_path = resolve_model(model)
    sha = adapter_sha256(adapter_dir)
    recorded = None
    if (adapter_dir / "manifest.json").exists():
        recorded = json.loads((adapter_dir / "manifest.json").read_text()).get("adapter_sha256")
        if recorded is not None and recorded != sha:
            raise ExportError(f"{adapter_dir}'s weights (sha256 {sha[:12]}) are not the ones its manifest "
                              f"records ({recorded[:12]}): the adapter changed after training. To fix: "
                              "export the adapter as rayquant wrote it")

    torch_dtype = getattr(torch, DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base_model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype).to(device)
    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir)).to(device)
    peft_model.eval()
    ids = tokenizer(CHECK_TEXT, return_tensors="pt")["input_ids"][:, :CHECK_TOKENS].to(device)
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits.float()
        merged_model = peft_model.merge_and_unload(safe_merge=True)
        merged = merged_model(input_ids=ids).logits.float()
    scale = float(unmerged.abs().max()) or 1.0
    max_diff = float((merged - unmerged).abs().max())
    check = {"tokens": int(ids.shape[1]), "max_abs_logit_diff": max_diff, "max_abs_logit": scale,
             "relative": max_diff / scale, "tolerance": TOLERANCE[dtype]}
    if not max_diff / scale <= TOLERANCE[dtype]:
        raise ExportCheckError(f"the merged model's logits differ from base + adapter by {max_diff:.3g} "
                               f"({max_diff / scale:.2%} of the largest logit, over the {TOLERANCE[dtype]:.0%} "
                               f"{dtype} rounding allows) on {ids.shape[1]} tokens; nothing was written")

    info = {"written_by": "rayquant", "kind": "merged LoRA", "base_model": model, "dtype": DTYPES[dtype],
            "adapter_dir": str(adapter_dir), "adapter_sha256": sha, "check": check}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        merged_model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(info, indent=2))
        publish_dir(tmp, out)  # out: empty, or a previous export of ours (checked above)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info
