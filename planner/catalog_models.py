"""The model catalog as data: popular architectures keyed by Hugging Face hub id, offline.

Each row's `config` holds the fields of the model's real config.json that fix its shape (copied,
not derived), so a catalog row goes through the same parser as a downloaded config.json. `source`
names the config.json the figures come from; `params` is the model's published exact parameter
count where one is published (checked against the computed count by tests/test_model.py).

Instruct/chat variants share their base's shape, and Unsloth's repackaged names map to their base:
`unsloth/<Name>-bnb-4bit` and `unsloth/<Name>-unsloth-bnb-4bit` are pre-quantized bitsandbytes NF4
checkpoints, `unsloth/<Name>-FP8` pre-quantized FP8 ones.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from planner.architecture import ModelSpec


def _llama(hidden, inter, layers, heads, kv, vocab, tie=False, max_pos=131072, head_dim=None,
           dtype="bfloat16", arch="LlamaForCausalLM", model_type="llama", **extra):
    cfg = dict(architectures=[arch], model_type=model_type, hidden_size=hidden,
               intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tie,
               max_position_embeddings=max_pos, torch_dtype=dtype, **extra)
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    return cfg


def _qwen2(hidden, inter, layers, heads, kv, vocab, tie, max_pos=32768):
    return _llama(hidden, inter, layers, heads, kv, vocab, tie, max_pos,
                  arch="Qwen2ForCausalLM", model_type="qwen2")


def _qwen3(hidden, inter, layers, heads, kv, tie, max_pos=40960):
    return _llama(hidden, inter, layers, heads, kv, 151936, tie, max_pos, head_dim=128,
                  arch="Qwen3ForCausalLM", model_type="qwen3")


def _gemma2(hidden, inter, layers, heads, kv, head_dim):
    return _llama(hidden, inter, layers, heads, kv, 256000, True, 8192, head_dim=head_dim,
                  dtype="float32", arch="Gemma2ForCausalLM", model_type="gemma2")


def _gemma3(hidden, inter, layers, heads, kv, head_dim, vocab=262208):
    # Gemma 3 4b/12b/27b are multimodal: their config.json nests the language model in text_config
    # (vocab_size omitted there: Gemma3TextConfig's default 262208). Only the text model trains here.
    text = dict(model_type="gemma3_text", hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=head_dim, vocab_size=vocab)
    return dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3",
                text_config=text, torch_dtype="bfloat16")


def _phi3(hidden, inter, layers, heads, kv, vocab, max_pos):
    return _llama(hidden, inter, layers, heads, kv, vocab, False, max_pos,
                  arch="Phi3ForCausalLM", model_type="phi3")


def _gpt_oss(layers, experts):
    return dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss", hidden_size=2880,
                intermediate_size=2880, num_hidden_layers=layers, num_attention_heads=64,
                num_key_value_heads=8, head_dim=64, vocab_size=201088, tie_word_embeddings=False,
                num_local_experts=experts, num_experts_per_tok=4, attention_bias=True,
                max_position_embeddings=131072, torch_dtype="bfloat16",
                quantization_config={"quant_method": "mxfp4"})


HF = "https://huggingface.co/{}/blob/main/config.json"

# (hub id, config.json shape fields, published exact parameter count or None)
MODEL_ROWS: tuple[tuple[str, dict[str, Any], int | None], ...] = (
    ("meta-llama/Llama-2-7b-hf", _llama(4096, 11008, 32, 32, 32, 32000, max_pos=4096,
                                        dtype="float16"), 6_738_415_616),
    ("meta-llama/Llama-2-13b-hf", _llama(5120, 13824, 40, 40, 40, 32000, max_pos=4096,
                                         dtype="float16"), 13_015_864_320),
    ("meta-llama/Llama-2-70b-hf", _llama(8192, 28672, 80, 64, 8, 32000, max_pos=4096,
                                         dtype="float16"), 68_976_648_192),
    ("meta-llama/Meta-Llama-3-8B", _llama(4096, 14336, 32, 32, 8, 128256, max_pos=8192),
     8_030_261_248),
    ("meta-llama/Meta-Llama-3-70B", _llama(8192, 28672, 80, 64, 8, 128256, max_pos=8192),
     70_553_706_496),
    ("meta-llama/Llama-3.1-8B", _llama(4096, 14336, 32, 32, 8, 128256), 8_030_261_248),
    ("meta-llama/Llama-3.1-70B", _llama(8192, 28672, 80, 64, 8, 128256), 70_553_706_496),
    ("meta-llama/Llama-3.1-405B", _llama(16384, 53248, 126, 128, 8, 128256), 405_853_388_800),
    ("meta-llama/Llama-3.2-1B", _llama(2048, 8192, 16, 32, 8, 128256, tie=True, head_dim=64),
     1_235_814_400),
    ("meta-llama/Llama-3.2-3B", _llama(3072, 8192, 28, 24, 8, 128256, tie=True, head_dim=128),
     3_212_749_824),
    ("meta-llama/Llama-3.3-70B-Instruct", _llama(8192, 28672, 80, 64, 8, 128256), 70_553_706_496),
    ("mistralai/Mistral-7B-v0.1", _llama(4096, 14336, 32, 32, 8, 32000, max_pos=32768,
                                         arch="MistralForCausalLM", model_type="mistral"),
     7_241_732_096),
    ("mistralai/Mistral-7B-v0.3", _llama(4096, 14336, 32, 32, 8, 32768, max_pos=32768,
                                         arch="MistralForCausalLM", model_type="mistral"),
     7_248_023_552),
    ("mistralai/Mixtral-8x7B-v0.1", _llama(4096, 14336, 32, 32, 8, 32000, max_pos=32768,
                                           arch="MixtralForCausalLM", model_type="mixtral",
                                           num_local_experts=8, num_experts_per_tok=2),
     46_702_792_704),
    ("Qwen/Qwen2.5-0.5B", _qwen2(896, 4864, 24, 14, 2, 151936, True), 494_032_768),
    ("Qwen/Qwen2.5-1.5B", _qwen2(1536, 8960, 28, 12, 2, 151936, True), 1_543_714_304),
    ("Qwen/Qwen2.5-3B", _qwen2(2048, 11008, 36, 16, 2, 151936, True), 3_085_938_688),
    ("Qwen/Qwen2.5-7B", _qwen2(3584, 18944, 28, 28, 4, 152064, False, 131072), 7_615_616_512),
    ("Qwen/Qwen2.5-14B", _qwen2(5120, 13824, 48, 40, 8, 152064, False, 131072), 14_770_033_664),
    ("Qwen/Qwen2.5-32B", _qwen2(5120, 27648, 64, 40, 8, 152064, False, 131072), 32_763_876_352),
    ("Qwen/Qwen2.5-72B", _qwen2(8192, 29568, 80, 64, 8, 152064, False, 131072), 72_706_203_648),
    ("Qwen/Qwen3-0.6B", _qwen3(1024, 3072, 28, 16, 8, True), None),
    ("Qwen/Qwen3-1.7B", _qwen3(2048, 6144, 28, 16, 8, True), None),
    ("Qwen/Qwen3-4B", _qwen3(2560, 9728, 36, 32, 8, True), None),
    ("Qwen/Qwen3-8B", _qwen3(4096, 12288, 36, 32, 8, False), 8_190_735_360),
    ("Qwen/Qwen3-14B", _qwen3(5120, 17408, 40, 40, 8, False), 14_768_307_200),
    ("Qwen/Qwen3-32B", _qwen3(5120, 25600, 64, 64, 8, False), 32_762_123_264),
    ("Qwen/Qwen3-30B-A3B", dict(_qwen3(2048, 6144, 48, 32, 4, False), architectures=[
        "Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[]), 30_532_122_624),
    ("google/gemma-2-2b", _gemma2(2304, 9216, 26, 8, 4, 256), 2_614_341_888),
    ("google/gemma-2-9b", _gemma2(3584, 14336, 42, 16, 8, 256), 9_241_705_984),
    ("google/gemma-2-27b", _gemma2(4608, 36864, 46, 32, 16, 128), 27_227_128_320),
    ("google/gemma-3-1b-pt", _llama(1152, 6912, 26, 4, 1, 262144, tie=True, max_pos=32768,
                                    head_dim=256, arch="Gemma3ForCausalLM",
                                    model_type="gemma3_text"), 999_885_952),
    ("google/gemma-3-4b-pt", _gemma3(2560, 10240, 34, 8, 4, 256), None),
    ("google/gemma-3-12b-pt", _gemma3(3840, 15360, 48, 16, 8, 256), None),
    ("google/gemma-3-27b-pt", _gemma3(5376, 21504, 62, 32, 16, 128), None),
    ("microsoft/Phi-3-mini-4k-instruct", _phi3(3072, 8192, 32, 32, 32, 32064, 4096), 3_821_079_552),
    ("microsoft/Phi-3-medium-4k-instruct", _phi3(5120, 17920, 40, 40, 10, 32064, 4096),
     13_960_238_080),
    ("microsoft/phi-4", _phi3(5120, 17920, 40, 40, 10, 100352, 16384), 14_659_507_200),
    ("openai/gpt-oss-20b", _gpt_oss(24, 32), None),
    ("openai/gpt-oss-120b", _gpt_oss(36, 128), None),
)

MODEL_CATALOG: dict[str, ModelSpec] = {
    hub_id: dataclasses.replace(ModelSpec.from_config(cfg, name=hub_id), source=HF.format(hub_id))
    for hub_id, cfg, _ in MODEL_ROWS
}
PUBLISHED_PARAMS: dict[str, int] = {hub_id: n for hub_id, _, n in MODEL_ROWS if n is not None}


def catalog_ids() -> tuple[str, ...]:
    return tuple(MODEL_CATALOG)


# Suffixes that name a variant with its base's shape: instruct/chat tunes, Unsloth repackaging.
_VARIANT = re.compile(r"(-unsloth-bnb-4bit|-bnb-4bit|-fp8(-dynamic)?|-instruct(-\d+)?|-it|-chat|-hf"
                      r"|-base|-pt|-unsloth)$", re.IGNORECASE)
_BY_KEY = {k.lower(): k for k in MODEL_CATALOG}
_BY_SHORT = {k.split("/", 1)[1].lower(): k for k in MODEL_CATALOG}


def _find(short: str) -> str | None:
    """The catalog id for a name without org, stripping variant suffixes until one matches."""
    name = short.lower()
    while True:
        for cand in (name, name.removeprefix("meta-"), "meta-" + name):
            for suffix in ("", "-hf", "-pt", "-instruct"):
                if cand + suffix in _BY_SHORT:
                    return _BY_SHORT[cand + suffix]
        stripped = _VARIANT.sub("", name)
        if stripped == name:
            return None
        name = stripped


def catalog_spec(name: str) -> ModelSpec | None:
    """The catalog's ModelSpec for a hub id (case-insensitive, org optional), or None.

    Unsloth names carry prequantized ("bnb-4bit" or "fp8") and base_model (the unquantized hub id).
    """
    text = name.strip()
    if text.lower() in _BY_KEY:
        return MODEL_CATALOG[_BY_KEY[text.lower()]]
    org, _, short = text.rpartition("/")
    hub_id = _find(short)
    if hub_id is None:
        return None
    spec = MODEL_CATALOG[hub_id]
    lower = short.lower()
    prequantized = ("bnb-4bit" if lower.endswith("bnb-4bit") else
                    "fp8" if re.search(r"-fp8(-dynamic)?$", lower) else spec.prequantized)
    if prequantized == spec.prequantized and not org.lower() == "unsloth" and (
            short.lower() == hub_id.split("/", 1)[1].lower()):
        return spec
    base = None
    if prequantized != spec.prequantized:
        base_short = re.sub(r"(-unsloth-bnb-4bit|-bnb-4bit|-fp8(-dynamic)?)$", "", short,
                            flags=re.IGNORECASE)
        base = f"{hub_id.split('/', 1)[0]}/{base_short}"
    return dataclasses.replace(spec, name=text, prequantized=prequantized, base_model=base)
