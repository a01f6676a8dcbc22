"""ModelSpec: a decoder-only architecture's shape, from a Hugging Face config.json or the catalog.

TODO(catalog helper): from_config, catalog of popular architectures, exact parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str  # hub id or path as given
    architecture: str  # config "architectures"[0] or model_type, e.g. "LlamaForCausalLM"
    model_type: str  # e.g. "llama", "qwen2", "mixtral"
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (per expert for MoE: see moe_intermediate_size)
    vocab_size: int
    tie_word_embeddings: bool
    gated_mlp: bool = True  # SwiGLU/GeGLU: gate_proj, up_proj, down_proj
    num_experts: int = 0  # 0: dense
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    attention_bias: bool = False
    max_position_embeddings: int = 0
    prequantized: str | None = None  # "bnb-4bit", "fp8", ... for pre-quantized checkpoints
    base_model: str | None = None  # for pre-quantized names: the hub id of the base
    torch_dtype: str = "bfloat16"
