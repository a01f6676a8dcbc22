"""rayquant: resource-aware LoRA/QLoRA fine-tuning on Ray clusters with mixed GPUs.

Importing this package stays light; the training stack loads when a trainer is used.
"""

__version__ = "0.1.0"
