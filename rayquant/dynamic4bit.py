"""Dynamic 4-bit: NF4 with double quantization, sensitive modules kept in 16-bit under a byte budget.

Which modules stay 16-bit, in order, while the node's spare memory (``NodePlan.protected_budget_bytes``)
lasts: first the projections of the first and last decoder layers (they see the raw embeddings and
feed the head; Unsloth's dynamic 4-bit quants keep such modules unquantized for the same reason), then
the other projections ranked by their measured NF4 error on the actual weights. The error of a module
is ``||W - dequant(quant(W))|| / ||W||`` with bitsandbytes' own quantize_4bit/dequantize_4bit, measured
when the worker loads (from the safetensors files, one tensor at a time, without building the model).

Use it from a worker::

    errors = measure_errors_from_checkpoint(model_dir, device="cuda")
    protection = select_protected(errors, node_plan.protected_budget_bytes)
    model = from_pretrained(..., quantization_config=bnb_quantization_config(protection.protected, dtype))
    restore_protected_modules(model, model_dir, protection.protected)  # no-op where the config was honoured

The rule itself (candidates, order, greedy budget, cost) is planner.memory.protected, plain Python
shared with the planner; this module measures, loads and restores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from planner.memory.protected import (ALREADY_16BIT, ModuleError, Protection, is_candidate, layer_of,
                                      protect_cost_bytes, protection_weight_bytes, select_protected)
from planner.tensor_bytes import NF4_BLOCK

# The rule (candidates, order, greedy budget, cost) lives in planner.memory.protected, shared with
# the planner, which prices it into a plan's and an estimate's peak.
__all__ = ["ALREADY_16BIT", "ModuleError", "Protection", "protect_cost_bytes", "select_protected",
           "measure_errors_from_checkpoint", "measure_errors_from_model", "protection_for",
           "protection_for_plan", "after_load", "bnb_quantization_config", "restore_protected_modules"]
_is_candidate, _layer_of = is_candidate, layer_of


# ---- measuring (torch + bitsandbytes) --------------------------------------------------------------

def nf4_relative_error(weight, double_quant: bool = True, max_elements: int | None = None) -> float:
    """||W - dequantize_4bit(quantize_4bit(W))|| / ||W|| with bitsandbytes' NF4, on W's device.

    With max_elements, evenly spaced whole rows stand in for the weight (NF4 blocks run along rows, so
    the sample's error estimates the whole weight's); used on CPU where quantizing 8B weights is slow.
    """
    import bitsandbytes.functional as bnbf
    import torch

    w = weight.detach()
    if w.dim() != 2:
        w = w.reshape(w.shape[0], -1)
    if max_elements is not None and w.numel() > max_elements:
        rows = max(1, max_elements // w.shape[1])
        idx = torch.linspace(0, w.shape[0] - 1, rows, device=w.device).round().long().unique()
        w = w.index_select(0, idx)
    if not w.dtype.is_floating_point or w.dtype == torch.float64:
        w = w.float()
    w = w.to(torch.bfloat16) if w.dtype == torch.float32 else w
    q, state = bnbf.quantize_4bit(w.contiguous(), blocksize=NF4_BLOCK, quant_type="nf4",
                                  compress_statistics=double_quant)
    dq = bnbf.dequantize_4bit(q, state)
    ref = w.float()
    norm = ref.norm().item()
    return 0.0 if norm == 0.0 else (dq.float() - ref).norm().item() / norm


def _safetensors_files(model_dir: str | Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors files in {model_dir}: dynamic 4-bit measures NF4 error on the "
            "checkpoint's weights. To fix: point at a model directory saved with safe_serialization "
            "(or use quantization 'nf4')")
    return files


def measure_errors_from_checkpoint(model_dir: str | Path, device: str | None = None,
                                   double_quant: bool = True,
                                   max_elements: int | None = None) -> list[ModuleError]:
    """NF4 error of every quantizable decoder projection, reading one tensor at a time.

    `device`: where to quantize (default: "cuda" when available, else "cpu" with max_elements 2**22).
    """
    import torch
    from safetensors import safe_open

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if max_elements is None and device == "cpu":
        max_elements = 2**22
    out = []
    for path in _safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if not key.endswith(".weight"):
                    continue
                name = key[: -len(".weight")]
                if not _is_candidate(name):
                    continue
                shape = f.get_slice(key).get_shape()
                if len(shape) != 2:
                    continue
                w = f.get_tensor(key).to(device)
                err = nf4_relative_error(w, double_quant, max_elements)
                out.append(ModuleError(name, _layer_of(name), int(shape[0] * shape[1]), err))
                del w
    return sorted(out, key=lambda e: e.name)


def measure_errors_from_model(model, double_quant: bool = True,
                              max_elements: int | None = None) -> list[ModuleError]:
    """The same measurement on a loaded 16-bit model's nn.Linear layers."""
    from torch import nn

    return sorted((ModuleError(name, _layer_of(name), m.weight.numel(),
                               nf4_relative_error(m.weight, double_quant, max_elements))
                   for name, m in model.named_modules()
                   if type(m) is nn.Linear and _is_candidate(name)), key=lambda e: e.name)


# ---- loading ---------------------------------------------------------------------------------------

def bnb_quantization_config(protected: Iterable[str], compute_dtype, double_quant: bool = True):
    """transformers' BitsAndBytesConfig for NF4 with `protected` (full module names) left 16-bit.

    transformers matches skip entries as a prefix, a regex from the start or a suffix
    (quantizers/quantizers_utils.py should_convert_module); full names match exactly one module.
    Unsloth's GPU loader keeps a caller's BitsAndBytesConfig as given (models/llama.py: "a
    BitsAndBytesConfig passed by the caller stays authoritative"); its CPU fallback drops it, which
    is what restore_protected_modules repairs.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(ALREADY_16BIT) + list(protected))


def restore_protected_modules(model, model_dir: str | Path, protected: Iterable[str]) -> list[str]:
    """Replace any protected module that was loaded as bitsandbytes Linear4bit by a 16-bit nn.Linear
    holding the checkpoint's original weights (not the dequantized ones). Returns the names replaced.

    Call after loading and before applying LoRA. A module already 16-bit is left alone.
    """
    import bitsandbytes as bnb
    import torch
    from safetensors import safe_open

    wanted = {}
    for name in protected:
        module = model.get_submodule(name)
        if isinstance(module, bnb.nn.Linear4bit):
            wanted[name] = module
    if not wanted:
        return []
    found = {}
    for path in _safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for name in wanted:
                if f"{name}.weight" in keys:
                    found[name] = f.get_tensor(f"{name}.weight")
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise KeyError(f"protected modules not in the checkpoint {model_dir}: {missing}")
    for name, old in wanted.items():
        dtype = getattr(old, "compute_dtype", None) or torch.bfloat16
        device = old.weight.device
        new = torch.nn.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                              device="meta")
        new.weight = torch.nn.Parameter(found[name].to(device=device, dtype=dtype), requires_grad=False)
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.detach().to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return sorted(wanted)


def protected_weight_bytes(model, protected: Iterable[str]) -> int:
    """Bytes the protected modules' weights really hold once loaded (for the manifest)."""
    total = 0
    for name in protected:
        w = model.get_submodule(name).weight
        total += w.numel() * w.element_size()
    return total


def protection_for(model_path: str | Path, budget_bytes: int, double_quant: bool = True,
                   backend: str = "unsloth") -> Protection:
    """Measure NF4 errors of `model_path`'s weights (a local directory, or a hub id already in the
    local cache) and choose the protected modules within `budget_bytes` (priced for `backend`:
    planner.memory.protected.protection_weight_bytes)."""
    path = local_model_dir(model_path)
    if budget_bytes <= 0:
        return Protection((), 0, max(budget_bytes, 0), 0)
    return select_protected(measure_errors_from_checkpoint(path, double_quant=double_quant),
                            budget_bytes, double_quant, protection_weight_bytes(backend))


def local_model_dir(model_path: str | Path) -> Path:
    """A directory holding the checkpoint (a hub id resolves to its cached snapshot)."""
    path = Path(model_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model_path), allow_patterns=["*.safetensors", "*.json"]))


def protection_for_plan(model_path: str | Path, node_plan) -> Protection | None:
    """For rayquant.loading: the Protection a dynamic-4bit NodePlan asks for, None for other schemes."""
    if node_plan.quantization != "dynamic-4bit":
        return None
    return protection_for(model_path, node_plan.protected_budget_bytes, node_plan.double_quant,
                          node_plan.backend)


def after_load(model, model_path: str | Path, protection: Protection | None) -> dict:
    """For rayquant.loading, after the base loads and before LoRA: make the protected modules 16-bit
    where the loader ignored the skip list (Unsloth's CPU fallback), and return the manifest fields."""
    if protection is None:
        return {}
    restored = restore_protected_modules(model, local_model_dir(model_path), protection.protected)
    return {**protection.as_dict(), "protected_restored_after_load": len(restored),
            "protected_weight_bytes": protected_weight_bytes(model, protection.protected)}
