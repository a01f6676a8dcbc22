"""The plan's optimizer, built by the worker itself."""

from __future__ import annotations


def build_optimizer(name: str, params, lr: float, weight_decay: float):
    """The plan's optimizer, built here so it runs as planned (Unsloth's CPU path would swap
    bitsandbytes' 8-bit AdamW for torch AdamW, though bitsandbytes runs it on CPU). Returns
    (optimizer, name of its class) for the manifest."""
    import torch

    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay), "bitsandbytes.optim.AdamW8bit"
    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        if torch.cuda.is_available():
            return (bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay),
                    "bitsandbytes.optim.PagedAdamW8bit")
        # Paging moves states to host memory under GPU pressure; with no GPU the states already
        # live there, and the 8-bit update is the same.
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay), "bitsandbytes.optim.AdamW8bit"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), "torch.optim.AdamW"
