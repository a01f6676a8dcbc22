"""Peak memory of one training worker, one named term per module, each with its formula's source:

  weights.py      base weights by scheme (16-bit, NF4 with or without double quant, FP8 + row scales)
  trainable.py    LoRA adapters (fp32), gradients, AdamW states (torch or bitsandbytes 8-bit)
  activations.py  what autograd keeps for the backward, by checkpointing mode
  logits.py       the LM head's logits and the loss (chunked with `unsloth`, whole with `hf`)
  overhead.py     CUDA context, cuBLAS workspaces, caching-allocator slack
  protected.py    dynamic 4-bit's protected modules: the one rule the worker and the planner share
  estimate.py     estimate_memory composes them; max_seq_len searches over it

Per-tensor byte counts (NF4, FP8, 8-bit optimizer states) are planner.tensor_bytes.
"""

from planner.memory.estimate import (MemoryEstimate, budget_bytes, estimate_memory, estimate_with_protection,
                                     max_seq_len)

__all__ = ["MemoryEstimate", "budget_bytes", "estimate_memory", "estimate_with_protection", "max_seq_len"]
