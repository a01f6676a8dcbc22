"""rayquant: resource-aware LoRA/QLoRA fine-tuning on Ray clusters with mixed GPUs.

    from rayquant import RayQuantTrainer

Importing this package stays light: `RayQuantTrainer` and `TrainResult` are loaded on first use
(the training stack loads only when a trainer trains).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["RayQuantTrainer", "TrainResult", "__version__"]

_LAZY = {"RayQuantTrainer": "rayquant.trainer", "TrainResult": "rayquant.trainer"}

if TYPE_CHECKING:
    from rayquant.trainer import RayQuantTrainer, TrainResult


def __getattr__(name: str) -> Any:
    # PEP 562: `import rayquant` must not pull in the trainer module's imports.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rayquant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
