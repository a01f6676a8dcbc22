"""The one vocabulary every face imports: the choices a setting takes, its defaults, and the
neutral names the planner's messages use for settings.

The CLI's `click.Choice` lists, the YAML config's checks, JobSpec and NodePlan all read these
tuples, so a new scheme or optimizer is added here once. Standard library only.
"""

from __future__ import annotations

import re
from typing import Callable

QUANTIZATIONS = ("bf16", "fp16", "nf4", "dynamic-4bit", "fp8")
# In the planner's tie-break order: exact fp32 states first.
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")
CHECKPOINTING = ("none", "hf", "unsloth")
PLACEMENTS = ("per-gpu", "node-spanning", "zero3")
BACKENDS = ("unsloth", "hf")
PREFERENCES = ("accuracy", "balanced", "speed")
DATASET_FORMATS = ("auto", "text", "messages", "alpaca")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
# The linear layers of a decoder block that LoRA may target (Llama/Qwen/Mistral/Gemma names).
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LORA_RANK = 16


def default_lora_alpha(rank: int) -> int:
    """LoRA alpha when none is given: equal to the rank (a scale alpha/rank of 1, PEFT's and
    Unsloth's convention). Every path (a plan from `rayquant plan`, `plan: auto`, k8s) uses this."""
    return rank


# -- settings named in messages ---------------------------------------------------------------------

# Neutral names of the settings a message may tell the user to change. The planner writes them in
# braces ("lower {seq_len} to 4096"); str() of the error shows the neutral name, and each face
# (CLI flags, YAML keys, Python arguments) renders its own spelling with render_settings().
SETTINGS = (
    "model", "gpus", "seq_len", "global_batch_size", "micro_batch_size", "lora_rank", "lora_alpha",
    "lora_dropout", "lora_targets", "full_finetune", "quantization", "double_quant", "optimizer",
    "gradient_checkpointing", "prefer", "backend", "safety_margin", "calibration", "overwrite",
    "output", "resume_anyway",
)
_PLACEHOLDER = re.compile(r"\{(" + "|".join(SETTINGS) + r")\}")


def render_settings(text: str, spell: Callable[[str], str] | None = None) -> str:
    """`text` with each {setting} placeholder replaced by `spell(setting)` (default: the neutral
    name). Braces that do not name a setting are left as they are."""
    return _PLACEHOLDER.sub(lambda m: (spell or str)(m.group(1)), text)


class SettingError(ValueError):
    """A user-facing error whose message may name settings as {placeholders}; str() shows neutral
    names, render(spell) the spelling of one face (`--seq-len`, `sft.seq_len`, ...)."""

    def __init__(self, message: str) -> None:
        self.template = message
        super().__init__(render_settings(message))

    def render(self, spell: Callable[[str], str] | None = None) -> str:
        return render_settings(self.template, spell)
