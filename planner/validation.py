"""The memory model held against measured and published figures (tests/data/validation.json).

Each figure is labelled `fit` (the constants fitted to data come from these only:
scripts/fit_constants.py) or `check` (tests/test_validation.py asserts on these; docs/planner.md's
tables are generated from them by scripts/validation_tables.py). `predict` re-predicts one figure
with today's planner; `rows` gives every comparable figure with its error; `median_error` the
median absolute error of one quantity over one role.

Quantities: `peak_memory` (allocated bytes, torch.cuda.max_memory_allocated: no CUDA context, no
allocator slack) and `max_context` (the longest sequence at micro-batch 1, counted up to the model's
positions as the publishers did). Standard library only.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from planner.architecture import ModelSpec
from planner.hardware import lookup_gpu
from planner.memory import estimate_memory, max_seq_len
from planner.model import load_model_spec
from planner.plan import JobSpec

# LitGPT's models that are not in our transformers-based catalog, built from their configs
# (litgpt/config.py: phi-1_5 and stablelm-base-alpha-3b): LayerNorm, non-gated GELU MLP, biases.
LITGPT_MODELS = {
    "litgpt:phi-1.5": ModelSpec(
        name="phi-1.5", architecture="PhiForCausalLM", model_type="phi", hidden_size=2048, num_layers=24,
        num_attention_heads=32, num_key_value_heads=32, head_dim=64, intermediate_size=8192,
        vocab_size=51200, tie_word_embeddings=False, gated_mlp=False, attention_bias=True,
        o_proj_bias=True),
    "litgpt:stablelm-base-alpha-3b": ModelSpec(
        name="stablelm-base-alpha-3b", architecture="GPTNeoXForCausalLM", model_type="gpt_neox",
        hidden_size=4096, num_layers=16, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
        intermediate_size=16384, vocab_size=50688, tie_word_embeddings=False, gated_mlp=False,
        attention_bias=True, o_proj_bias=True),
}
# LitGPT's chunked_cross_entropy keeps the bf16 logits plus each chunk's fp32 log-softmax: 6 B per
# logit (litgpt/utils.py), not the hf backend's 14.
LITGPT_LOGIT_BYTES = 2 + 4


@dataclass(frozen=True)
class Row:
    """One comparable figure: what the planner predicts against what was measured."""

    id: str
    quantity: str
    role: str
    compare: str
    source: str
    label: str
    predicted: float
    measured: Any  # a number, or "OOM"
    capacity: int = 0  # the device's bytes (for exceeds_device)

    @property
    def error(self) -> float | None:
        """predicted / measured - 1 (None where the measurement is an OOM)."""
        if not isinstance(self.measured, (int, float)):
            return None
        return self.predicted / self.measured - 1.0

    @property
    def holds(self) -> bool:
        """Whether the comparison's own rule holds: within 10% (equal), not below (upper_bound),
        a published OOM that no plan would place: over the device less the default safety margin
        (exceeds_device)."""
        if self.compare == "exceeds_device":
            return self.predicted > self.capacity * (1.0 - DEFAULT_SAFETY_MARGIN)
        if self.compare == "upper_bound":
            return self.error is not None and self.error >= 0.0
        return self.error is not None and abs(self.error) <= TARGET


TARGET = 0.10  # the target on check rows for memory and context
DEFAULT_SAFETY_MARGIN = JobSpec.safety_margin


def load(path: str | Path) -> list[dict]:
    """The figures of a validation file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))["figures"]


def _model(name: str) -> ModelSpec:
    return LITGPT_MODELS[name] if name in LITGPT_MODELS else load_model_spec(name)


def _config(setting: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("quantization", "double_quant", "backend", "micro_batch_size", "lora_rank", "lora_targets",
            "full_finetune", "gradient_checkpointing", "optimizer", "protected_bytes")
    out = {k: setting[k] for k in keys if k in setting}
    if isinstance(out.get("lora_targets"), list):
        out["lora_targets"] = tuple(out["lora_targets"])
    return out


def predict(figure: Mapping[str, Any]) -> tuple[float, int]:
    """(predicted value, device bytes) of one comparable figure."""
    s = figure["setting"]
    model, gpu = _model(s["model"]), lookup_gpu(s["gpu"])
    config = _config(s)
    if figure["quantity"] == "max_context":
        cap = int(figure.get("cap") or 0) or None
        return max_seq_len(model, gpu, upper=cap, **config), gpu.memory_bytes
    est = estimate_memory(model, gpu, seq_len=s["seq_len"],
                          **({**config, "kbit_upcast": False} if s.get("stack") == "litgpt" else config))
    if s.get("stack") != "litgpt":
        return est.allocated_bytes, gpu.memory_bytes
    # LitGPT (litgpt/finetune/lora.py): chunked CE (LITGPT_LOGIT_BYTES), and lora_dropout=0.05 on the
    # fused qkv input keeps a 16-bit output and a bool mask (3 B x h per token and layer). A published
    # OOM compares the device total (context and slack added), which is what runs out.
    tokens = s["seq_len"] * s["micro_batch_size"]
    allocated = (est.allocated_bytes - est.breakdown.logits + LITGPT_LOGIT_BYTES * tokens * model.vocab_size
                 + 3 * model.hidden_size * tokens * model.num_layers)
    if figure["compare"] == "exceeds_device":
        return allocated + est.context_bytes + est.slack_bytes, gpu.memory_bytes
    return allocated, gpu.memory_bytes


def rows(figures: Sequence[Mapping[str, Any]]) -> list[Row]:
    """Every comparable figure (not `not_represented`) with its prediction."""
    out = []
    for f in figures:
        if f["compare"] == "not_represented":
            continue
        predicted, capacity = predict(f)
        measured = f["measured"]
        if f["quantity"] == "max_context" and f.get("cap"):
            measured = min(measured, f["cap"])
        out.append(Row(id=f["id"], quantity=f["quantity"], role=f["role"], compare=f["compare"],
                       source=f["source"], label=f.get("label") or _label(f), predicted=predicted,
                       measured=measured, capacity=capacity))
    return out


def _label(f: Mapping[str, Any]) -> str:
    s = f["setting"]
    return f"{s['model'].split('/')[-1]} {s['quantization']} {s['backend']} on {s['gpu']}"


def median_error(table: Sequence[Row], quantity: str, role: str = "check") -> float:
    """Median absolute error over the rows of `quantity` and `role` compared for equality."""
    errors = [abs(r.error) for r in table
              if r.quantity == quantity and r.role == role and r.compare == "equal" and r.error is not None]
    return statistics.median(errors) if errors else 0.0
