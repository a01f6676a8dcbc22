"""ModelSpec: a decoder-only architecture's shape, from a Hugging Face config.json.

Parameter counts are exact: each term mirrors the modules transformers builds for the architecture
(`transformers/models/<type>/modeling_<type>.py`), so `ModelSpec.num_params` equals
`sum(p.numel() for p in model.parameters())` of the (text) model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from planner.plan import PlanError


class ModelConfigError(PlanError):
    """A config.json is missing, unreadable or lacks a field the planner needs."""


@dataclass(frozen=True)
class LinearShape:
    """One linear module of a decoder layer (HF module name; weight is out_features x in_features)."""

    name: str
    in_features: int
    out_features: int
    count: int = 1  # how many per decoder layer (experts for MoE)
    expert: bool = False
    bias: bool = False

    @property
    def params(self) -> int:
        bias = self.out_features if self.bias else 0
        return self.count * (self.in_features * self.out_features + bias)


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
    attention_bias: bool = False  # bias on q_proj, k_proj, v_proj
    max_position_embeddings: int = 0
    prequantized: str | None = None  # "bnb-4bit", "fp8", ... for pre-quantized checkpoints
    base_model: str | None = None  # for pre-quantized names: the hub id of the base
    torch_dtype: str = "bfloat16"
    o_proj_bias: bool = False  # Llama's attention_bias and gpt-oss put a bias on o_proj too
    fused_qkv: bool = False  # Phi-3: one qkv_proj instead of q_proj, k_proj, v_proj
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj instead of gate_proj, up_proj
    norms_per_layer: int = 2  # RMSNorms of width hidden per layer (Gemma 2/3: 4)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm of width head_dim on queries and keys
    attention_sinks: bool = False  # gpt-oss: one learned sink logit per head per layer
    router_bias: bool = False  # gpt-oss router has a bias
    expert_bias: bool = False  # gpt-oss experts have biases on gate_up and down
    shared_expert_gate: bool = False  # Qwen2-MoE: Linear(hidden, 1) gating the shared expert
    num_dense_layers: int = 0  # MoE models: layers that keep a dense MLP (mlp_only_layers)
    source: str = ""  # where the shape came from (config path or the catalog row's source)

    def __post_init__(self) -> None:
        problems = [f"{f} must be >= 1, got {getattr(self, f)}" for f in (
            "hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "vocab_size") if getattr(self, f) < 1]
        if self.num_experts == 0 and self.intermediate_size < 1:
            problems.append(f"intermediate_size must be >= 1, got {self.intermediate_size}")
        if self.num_experts and self.moe_intermediate_size < 1:
            problems.append("an MoE model needs moe_intermediate_size >= 1")
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            problems.append(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}")
        if problems:
            raise ModelConfigError(f"invalid model {self.name}: " + "; ".join(problems))

    # -- shapes --------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def _attention_linears(self) -> tuple[LinearShape, ...]:
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, \
            self.num_key_value_heads * self.head_dim
        b = self.attention_bias
        if self.fused_qkv:
            qkv = (LinearShape("qkv_proj", h, q + 2 * kv, bias=b),)
        else:
            qkv = (LinearShape("q_proj", h, q, bias=b), LinearShape("k_proj", h, kv, bias=b),
                   LinearShape("v_proj", h, kv, bias=b))
        return qkv + (LinearShape("o_proj", q, h, bias=self.o_proj_bias),)

    def _mlp_linears(self, width: int, count: int = 1, expert: bool = False,
                     bias: bool = False) -> tuple[LinearShape, ...]:
        h = self.hidden_size
        if not self.gated_mlp:
            return (LinearShape("up_proj", h, width, count, expert, bias),
                    LinearShape("down_proj", width, h, count, expert, bias))
        if self.fused_gate_up:
            return (LinearShape("gate_up_proj", h, 2 * width, count, expert, bias),
                    LinearShape("down_proj", width, h, count, expert, bias))
        return (LinearShape("gate_proj", h, width, count, expert, bias),
                LinearShape("up_proj", h, width, count, expert, bias),
                LinearShape("down_proj", width, h, count, expert, bias))

    def linear_layers(self) -> tuple[LinearShape, ...]:
        """The linear modules of ONE decoder layer (an MoE layer for MoE models).

        Experts carry count=num_experts and expert=True (transformers 5 stores them fused as 3-D
        parameters, same total); the router is the entry `gate`.
        """
        layers = self._attention_linears()
        if not self.is_moe:
            return layers + self._mlp_linears(self.intermediate_size)
        layers += (LinearShape("gate", self.hidden_size, self.num_experts, bias=self.router_bias),)
        layers += self._mlp_linears(self.moe_intermediate_size, self.num_experts, True,
                                    self.expert_bias)
        if self.shared_expert_intermediate_size:
            layers += self._mlp_linears(self.shared_expert_intermediate_size)
        if self.shared_expert_gate:
            layers += (LinearShape("shared_expert_gate", self.hidden_size, 1),)
        return layers

    def _dense_layer_linears(self) -> tuple[LinearShape, ...]:
        return self._attention_linears() + self._mlp_linears(self.intermediate_size)

    # -- parameter counts ----------------------------------------------------------------------
    def params_breakdown(self) -> dict[str, int]:
        """Exact parameter counts per component (whole model), plus `total`."""
        h, n = self.hidden_size, self.num_layers
        attn_names = {"q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj"}

        def split(linears: tuple[LinearShape, ...]) -> tuple[int, int, int]:
            attn = sum(x.params for x in linears if x.name in attn_names)
            router = sum(x.params for x in linears if x.name == "gate")
            return attn, sum(x.params for x in linears) - attn - router, router

        moe_layers = n - self.num_dense_layers if self.is_moe else 0
        attn_l, mlp_l, router_l = split(self.linear_layers() if self.is_moe
                                        else self._dense_layer_linears())
        attn_d, mlp_d, _ = split(self._dense_layer_linears())
        extra_attn = self.num_attention_heads if self.attention_sinks else 0
        dense_layers = n - moe_layers
        attention = (attn_l + extra_attn) * moe_layers + (attn_d + extra_attn) * dense_layers
        mlp = mlp_l * moe_layers + mlp_d * dense_layers
        router = router_l * moe_layers
        # RMSNorm weights: per-layer norms of width hidden, q/k norms of width head_dim, final norm.
        norms = n * (self.norms_per_layer * h + (2 * self.head_dim if self.qk_norm else 0)) + h
        embeddings = self.vocab_size * h
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * h
        parts = {"embeddings": embeddings, "attention": attention, "mlp": mlp, "router": router,
                 "norms": norms, "lm_head": lm_head}
        parts["total"] = sum(parts.values())
        return parts

    @property
    def num_params(self) -> int:
        return self.params_breakdown()["total"]

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (an MoE layer for MoE models), norms included."""
        linears = self.linear_layers()
        return (sum(x.params for x in linears) + self.norms_per_layer * self.hidden_size
                + (2 * self.head_dim if self.qk_norm else 0)
                + (self.num_attention_heads if self.attention_sinks else 0))

    @property
    def active_params(self) -> int:
        """Parameters one token passes through (MoE: only num_experts_per_tok experts)."""
        if not self.is_moe:
            return self.num_params
        per_expert = sum(x.params // x.count for x in self.linear_layers() if x.expert)
        idle = (self.num_experts - self.num_experts_per_tok) * per_expert
        return self.num_params - idle * (self.num_layers - self.num_dense_layers)

    # -- LoRA ----------------------------------------------------------------------------------
    def target_names(self) -> tuple[str, ...]:
        """Names LoRA may target in this architecture, in module order."""
        seen: dict[str, None] = {}
        for x in self.linear_layers():
            seen.setdefault(x.name, None)
        return tuple(seen)

    def resolve_targets(self, targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
        """`"all"` -> every linear of the decoder blocks except the router; names are checked.

        On fused architectures (Phi-3) the split names map to the fused module that holds them
        (q_proj/k_proj/v_proj -> qkv_proj, gate_proj/up_proj -> gate_up_proj).
        """
        valid = self.target_names()
        if targets == "all" or (not isinstance(targets, str) and tuple(targets) == ("all",)):
            return tuple(n for n in valid if n != "gate")
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        aliases = {}
        if self.fused_qkv:
            aliases.update(q_proj="qkv_proj", k_proj="qkv_proj", v_proj="qkv_proj")
        if self.fused_gate_up:
            aliases.update(gate_proj="gate_up_proj", up_proj="gate_up_proj")
        out: dict[str, None] = {}
        unknown = []
        for t in targets:
            t = aliases.get(t, t)
            if t in valid:
                out.setdefault(t, None)
            else:
                unknown.append(t)
        if unknown:
            raise PlanError(f"LoRA target(s) {', '.join(map(repr, unknown))} are not linear layers of "
                            f"{self.name} ({self.model_type}). To fix: choose from "
                            f"{', '.join(valid)}, or pass 'all'.")
        if not out:
            raise PlanError("no LoRA targets given: name modules (q_proj,v_proj,...) or pass 'all'")
        return tuple(out)

    def lora_params(self, rank: int, targets: str | tuple[str, ...] = "all",
                    include_experts: bool = True) -> int:
        """LoRA parameters over all layers: per targeted module A (r x in) + B (out x r).

        Source: PEFT `peft/tuners/lora/layer.py` LoraLayer.update_layer builds lora_A =
        Linear(in, r, bias=False) and lora_B = Linear(r, out, bias=False). MoE experts count once
        per expert when targeted and `include_experts`; MoE models' dense layers use their dense MLP.
        """
        names = set(self.resolve_targets(targets))

        def per_layer(linears: tuple[LinearShape, ...]) -> int:
            return sum(x.count * rank * (x.in_features + x.out_features) for x in linears
                       if x.name in names and (include_experts or not x.expert))

        if not self.is_moe:
            return per_layer(self._dense_layer_linears()) * self.num_layers
        return (per_layer(self.linear_layers()) * (self.num_layers - self.num_dense_layers)
                + per_layer(self._dense_layer_linears()) * self.num_dense_layers)

    def summary(self) -> dict[str, Any]:
        """A small JSON-able description (for plans and manifests)."""
        return {"name": self.name, "architecture": self.architecture, "model_type": self.model_type,
                "num_params": self.num_params, "num_layers": self.num_layers,
                "hidden_size": self.hidden_size, "prequantized": self.prequantized,
                "base_model": self.base_model, "params_breakdown": self.params_breakdown()}

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | os.PathLike,
                    name: str | None = None) -> "ModelSpec":
        """From a config.json dict, a config.json file or a model directory."""
        where = "config"
        if not isinstance(config, Mapping):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            if not path.is_file():
                raise ModelConfigError(f"{where} does not exist. To fix: pass a model directory "
                                       "that holds config.json, or the config.json file itself.")
            try:
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelConfigError(f"{where} is not valid JSON ({e}). To fix: pass a Hugging "
                                       "Face config.json.") from None
            if not isinstance(config, Mapping):
                raise ModelConfigError(f"{where} is not a JSON object; expected a Hugging Face "
                                       "config.json")
            name = name or str(config.get("_name_or_path") or "") or str(path.parent)
        return _spec_from_dict(config, name or str(config.get("_name_or_path") or "model"), where)


# Defaults transformers 5 applies when a config.json omits the field (the `configuration_<type>.py`
# dataclass defaults): tie_word_embeddings, head_dim and vocab_size per model type.
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text"}
_DEFAULT_HEAD_DIM = {"qwen3": 128, "qwen3_moe": 128, "gemma2": 256, "gemma3_text": 256, "gpt_oss": 64}
_DEFAULT_VOCAB = {"gemma3_text": 262_208, "gpt_oss": 201_088, "phi3": 32_064, "gemma2": 256_000}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                         "gemma", "gemma2", "gemma3", "gemma3_text", "phi3", "gpt_oss")


def _spec_from_dict(raw: Mapping[str, Any], name: str, where: str) -> ModelSpec:
    cfg = dict(raw)
    outer_arch = (cfg.get("architectures") or [None])[0]
    if isinstance(cfg.get("text_config"), Mapping):
        # Multimodal wrappers (Gemma 3 4b+): the trainable language model is the text_config.
        text = dict(cfg["text_config"])
        text.setdefault("model_type", f"{cfg.get('model_type', '')}_text")
        cfg = text
        where += " (text_config)"
    model_type = str(cfg.get("model_type") or "")
    problems: list[str] = []

    def get_int(key: str, *alts: str, default: int | None = None) -> int:
        for k in (key, *alts):
            v = cfg.get(k)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    problems.append(f"{k}={v!r} must be a non-negative integer")
                    return 0
                return v
        if default is None:
            problems.append(f"{key} is missing")
            return 0
        return default

    hidden = get_int("hidden_size", "n_embd", "d_model")
    layers = get_int("num_hidden_layers", "n_layer", "num_layers")
    heads = get_int("num_attention_heads", "n_head")
    kv = get_int("num_key_value_heads", default=heads)
    vocab = get_int("vocab_size", default=_DEFAULT_VOCAB.get(model_type))
    default_hd = _DEFAULT_HEAD_DIM.get(model_type, hidden // heads if heads else 0)
    head_dim = get_int("head_dim", default=default_hd)
    num_experts = get_int("num_local_experts", "num_experts", default=0)
    moe_inter = get_int("moe_intermediate_size", default=0)
    intermediate = get_int("intermediate_size", "n_inner", "ffn_dim",
                           default=0 if num_experts and moe_inter else None)
    if num_experts and not moe_inter:
        moe_inter = intermediate  # Mixtral and gpt-oss give the per-expert width as intermediate_size
    experts_per_tok = get_int("num_experts_per_tok", "experts_per_token",
                              default=2 if num_experts else 0) if num_experts else 0
    shared_inter = get_int("shared_expert_intermediate_size", default=0) if num_experts else 0
    max_pos = get_int("max_position_embeddings", "n_positions", default=0)
    sparse_step = get_int("decoder_sparse_step", default=1) or 1
    if problems:
        raise ModelConfigError(f"{where} ({name}): " + "; ".join(problems) +
                               ". To fix: pass a decoder-only Hugging Face config.json "
                               f"(supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}).")
    dense_layers = 0
    if num_experts:
        mlp_only = set(cfg.get("mlp_only_layers") or ())
        dense_layers = sum(1 for i in range(layers)
                           if i in mlp_only or (i + 1) % sparse_step != 0)
    tie = cfg.get("tie_word_embeddings")
    if tie is None:
        tie = model_type in _TIED_BY_DEFAULT
    # q/k/v/o biases as each modeling file builds them: Qwen2 always biases q,k,v (bias=True);
    # Qwen2-MoE uses qkv_bias (default True); Llama-likes, Qwen3 and gpt-oss use attention_bias
    # for all four projections.
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    elif model_type == "qwen2_moe":
        qkv_bias, o_bias = bool(cfg.get("qkv_bias", True)), False
    else:
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    quant = cfg.get("quantization_config") or {}
    prequantized = None
    if isinstance(quant, Mapping) and quant:
        method = str(quant.get("quant_method", ""))
        if method == "bitsandbytes":
            prequantized = "bnb-4bit" if quant.get("load_in_4bit", True) else "bnb-8bit"
        elif method:
            prequantized = method
    try:
        return ModelSpec(
            name=name, architecture=str(outer_arch or (cfg.get("architectures") or [model_type])[0]),
            model_type=model_type, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv, head_dim=head_dim, intermediate_size=intermediate,
            vocab_size=vocab, tie_word_embeddings=bool(tie),
            num_experts=num_experts,
            num_experts_per_tok=experts_per_tok,
            moe_intermediate_size=moe_inter if num_experts else 0,
            shared_expert_intermediate_size=shared_inter,
            attention_bias=qkv_bias, o_proj_bias=o_bias,
            max_position_embeddings=max_pos,
            prequantized=prequantized, torch_dtype=dtype,
            fused_qkv=model_type == "phi3", fused_gate_up=model_type == "phi3",
            norms_per_layer=4 if model_type in ("gemma2", "gemma3_text", "gemma3") else 2,
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text", "gemma3"),
            attention_sinks=model_type == "gpt_oss", router_bias=model_type == "gpt_oss",
            expert_bias=model_type == "gpt_oss",
            shared_expert_gate=model_type == "qwen2_moe" and bool(
                shared_inter),
            num_dense_layers=dense_layers, source=where if where != "config" else "",
        )
    except ModelConfigError as e:
        raise ModelConfigError(f"{where}: {e}") from None
