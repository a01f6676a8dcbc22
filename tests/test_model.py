"""ModelSpec: config parsing, exact parameter counts (checked against transformers' real modules
and against published counts), LoRA targets, the catalog and `rayquant models`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from planner.catalog_models import MODEL_CATALOG, PUBLISHED_PARAMS
from planner.architecture import LinearShape, ModelConfigError, ModelSpec
from planner.model import UnknownModelError, load_model_spec
from planner.plan import PlanError
from planner.vocab import DEFAULT_LORA_TARGETS


# -- published exact counts -------------------------------------------------------------------
def test_llama_3_1_8b_has_exactly_8_030_261_248_parameters():
    spec = load_model_spec("meta-llama/Llama-3.1-8B")
    assert spec.num_params == 8_030_261_248
    parts = spec.params_breakdown()
    assert parts["embeddings"] == parts["lm_head"] == 128256 * 4096
    assert parts["router"] == 0
    assert sum(v for k, v in parts.items() if k != "total") == parts["total"]


@pytest.mark.parametrize("hub_id,count", [
    ("Qwen/Qwen2.5-0.5B", 494_032_768),
    ("mistralai/Mistral-7B-v0.3", 7_248_023_552),
    ("meta-llama/Llama-3.2-1B", 1_235_814_400),
])
def test_published_counts_named_in_the_issue(hub_id, count):
    assert load_model_spec(hub_id).num_params == count


def test_every_published_count_in_the_catalog_matches():
    assert len(PUBLISHED_PARAMS) >= 25
    wrong = {k: (MODEL_CATALOG[k].num_params, n) for k, n in PUBLISHED_PARAMS.items()
             if MODEL_CATALOG[k].num_params != n}
    assert not wrong


def test_gpt_oss_matches_its_model_card():
    # OpenAI's model card: 20b has 20.91B total / 3.61B active, 120b 116.83B / 5.13B; its
    # "active" excludes the embedding table (201088 x 2880).
    emb = 201088 * 2880
    for hub_id, total_b, active_b in (("openai/gpt-oss-20b", 20.91, 3.61),
                                      ("openai/gpt-oss-120b", 116.83, 5.13)):
        spec = load_model_spec(hub_id)
        assert round(spec.num_params / 1e9, 2) == total_b
        assert round((spec.active_params - emb) / 1e9, 2) == active_b
        assert spec.prequantized == "mxfp4"


def test_moe_active_params_and_router():
    mixtral = load_model_spec("mistralai/Mixtral-8x7B-v0.1")
    assert mixtral.is_moe and mixtral.params_breakdown()["router"] == 32 * 8 * 4096
    # Mistral AI's figure for Mixtral: 12.9B active of 46.7B.
    assert round(mixtral.active_params / 1e9, 1) == 12.9
    qwen_moe = load_model_spec("Qwen/Qwen3-30B-A3B")
    assert 3.3e9 <= qwen_moe.active_params < 3.4e9  # Qwen's card: "3.3B activated"


# -- against the real transformers modules ----------------------------------------------------
def _linear_shapes(layer) -> dict[str, tuple[int, int]]:
    import torch

    out = {}
    for name, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out[name.rsplit(".", 1)[-1]] = (mod.in_features, mod.out_features)
    return out


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen_dir"])
def test_tiny_model_matches_transformers(fixture, request):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(fixture)
    spec = ModelSpec.from_config(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    assert spec.num_params == sum(p.numel() for p in model.parameters())
    assert spec.layer_params == sum(p.numel() for p in model.model.layers[0].parameters())
    expected = {x.name: (x.in_features, x.out_features) for x in spec.linear_layers()}
    assert _linear_shapes(model.model.layers[0]) == expected
    assert spec.num_layers == len(model.model.layers)
    with open(model_dir / "config.json", encoding="utf-8") as f:
        assert ModelSpec.from_config(json.load(f)).num_params == spec.num_params


# Tiny configs of every architecture family the parser handles: each is built with transformers
# on CPU and its real parameter count compared with ours.
_BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
TINY_ARCHS = {
    "llama_bias": dict(_BASE, model_type="llama", attention_bias=True, tie_word_embeddings=True),
    "mistral": dict(_BASE, model_type="mistral", head_dim=32),
    "qwen2": dict(_BASE, model_type="qwen2", tie_word_embeddings=False),
    "qwen3": dict(_BASE, model_type="qwen3", head_dim=16),
    "gemma2": dict(_BASE, model_type="gemma2", head_dim=16),
    "gemma3_text": dict(_BASE, model_type="gemma3_text", head_dim=16),
    "phi3": dict(_BASE, model_type="phi3", pad_token_id=0),
    "mixtral": dict(_BASE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(_BASE, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=48),
    "qwen3_moe": dict(_BASE, model_type="qwen3_moe", head_dim=16, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1]),
    "gpt_oss": dict(_BASE, model_type="gpt_oss", head_dim=16, num_local_experts=4,
                    num_experts_per_tok=2, intermediate_size=64),
}


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_parameter_count_equals_transformers(arch):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_ARCHS[arch])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    spec = ModelSpec.from_config(config.to_dict(), name=arch)
    assert spec.num_params == sum(p.numel() for p in model.parameters()), spec.params_breakdown()
    layer0 = model.model.layers[0]
    assert spec.layer_params == sum(p.numel() for p in layer0.parameters())
    # transformers 5 keeps experts as fused 3-D parameters and the router as its own
    # parameter module, so only the other linears are nn.Linear modules.
    dense = {x.name: (x.in_features, x.out_features) for x in spec.linear_layers()
             if not x.expert and x.name != "gate"}
    assert _linear_shapes(layer0) == dense


# -- LoRA -------------------------------------------------------------------------------------
def test_lora_params_and_targets():
    spec = load_model_spec("meta-llama/Llama-3.1-8B")
    assert spec.resolve_targets("all") == DEFAULT_LORA_TARGETS
    # r=16 on all 7 projections of Llama-3.1-8B: PEFT reports 41,943,040 trainable parameters.
    assert spec.lora_params(16, "all") == 41_943_040
    qv = 32 * 16 * ((4096 + 4096) + (4096 + 1024))
    assert spec.lora_params(16, ("q_proj", "v_proj")) == qv
    assert spec.lora_params(16, "q_proj,v_proj") == qv
    with pytest.raises(PlanError) as e:
        spec.resolve_targets(("q_proj", "qkv"))
    assert "'qkv'" in str(e.value) and "down_proj" in str(e.value)


def test_lora_params_match_peft_on_the_tiny_model(tiny_llama_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    spec = ModelSpec.from_config(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    targets = ("q_proj", "k_proj", "down_proj")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=list(targets)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert spec.lora_params(4, targets) == trainable


def test_fused_and_moe_targets():
    phi = load_model_spec("microsoft/Phi-3-mini-4k-instruct")
    assert phi.resolve_targets("all") == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert phi.resolve_targets(DEFAULT_LORA_TARGETS) == phi.resolve_targets("all")
    moe = load_model_spec("mistralai/Mixtral-8x7B-v0.1")
    assert "gate" in moe.target_names() and "gate" not in moe.resolve_targets("all")
    experts = [x for x in moe.linear_layers() if x.expert]
    assert {x.count for x in experts} == {8} and len(experts) == 3
    attn_only = moe.lora_params(8, ("q_proj", "o_proj"))
    assert moe.lora_params(8, "all") > moe.lora_params(8, "all", include_experts=False) > attn_only
    assert LinearShape("x", 2, 3, count=4, bias=True).params == 4 * (6 + 3)


# -- config parsing ---------------------------------------------------------------------------
def test_from_config_file_dir_and_defaults(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from_dir = ModelSpec.from_config(tmp_path)
    from_file = ModelSpec.from_config(tmp_path / "config.json")
    assert from_dir.num_params == from_file.num_params
    assert from_dir.head_dim == 16 and from_dir.num_key_value_heads == 4
    assert from_dir.tie_word_embeddings is False  # LlamaConfig's default
    assert load_model_spec(str(tmp_path)).num_params == from_dir.num_params


def test_gemma3_text_config_nesting():
    spec = load_model_spec("google/gemma-3-4b-pt")
    assert spec.model_type == "gemma3_text" and spec.architecture.startswith("Gemma3")
    assert spec.num_layers == 34 and spec.hidden_size == 2560 and spec.qk_norm
    # KerasHub's text-only Gemma 3 presets publish exact counts with a 262144 vocabulary; HF's
    # text_config has 262208 rows (64 extra tokens x hidden).
    assert spec.num_params - 64 * 2560 == 3_880_099_328
    assert load_model_spec("google/gemma-3-12b-pt").num_params - 64 * 3840 == 11_765_788_416


@pytest.mark.parametrize("content,words", [
    ("{not json", ["not valid JSON"]),
    ('{"model_type": "llama", "hidden_size": 64}', ["num_hidden_layers is missing",
                                                    "num_attention_heads is missing"]),
    ('{"model_type": "llama", "hidden_size": "big", "num_hidden_layers": 2, '
     '"num_attention_heads": 4, "intermediate_size": 8, "vocab_size": 10}', ["hidden_size='big'"]),
    ("[1, 2]", ["not a JSON object"]),
])
def test_bad_config_names_the_field_and_the_file(tmp_path, content, words):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ModelConfigError) as e:
        ModelSpec.from_config(path)
    for w in words:
        assert w in str(e.value)
    assert str(path) in str(e.value)


def test_missing_config_path(tmp_path):
    with pytest.raises(ModelConfigError) as e:
        ModelSpec.from_config(tmp_path / "nope")
    assert "does not exist" in str(e.value)
    with pytest.raises(ModelConfigError) as e:
        load_model_spec(str(tmp_path))  # a directory without config.json
    assert "config.json" in str(e.value)


# -- catalog lookups --------------------------------------------------------------------------
def test_catalog_lookup_case_org_and_variants():
    base = MODEL_CATALOG["meta-llama/Llama-3.1-8B"]
    assert load_model_spec("META-LLAMA/llama-3.1-8b") is base
    assert load_model_spec("Llama-3.1-8B") is base
    instruct = load_model_spec("meta-llama/Llama-3.1-8B-Instruct")
    assert instruct.num_params == base.num_params and instruct.prequantized is None
    assert load_model_spec("google/gemma-2-9b-it").num_params == 9_241_705_984


@pytest.mark.parametrize("name,base,quant", [
    ("unsloth/Llama-3.2-1B-Instruct-unsloth-bnb-4bit", "meta-llama/Llama-3.2-1B-Instruct", "bnb-4bit"),
    ("unsloth/Meta-Llama-3.1-8B-bnb-4bit", "meta-llama/Meta-Llama-3.1-8B", "bnb-4bit"),
    ("unsloth/Qwen2.5-7B-Instruct-bnb-4bit", "Qwen/Qwen2.5-7B-Instruct", "bnb-4bit"),
    ("unsloth/Qwen3-8B-FP8", "Qwen/Qwen3-8B", "fp8"),
])
def test_unsloth_names_map_to_their_base(name, base, quant):
    spec = load_model_spec(name)
    assert (spec.name, spec.prequantized, spec.base_model) == (name, quant, base)
    assert spec.num_params == load_model_spec(base).num_params


def test_unknown_model_names_closest_ids_and_the_local_path_hint():
    with pytest.raises(UnknownModelError) as e:
        load_model_spec("meta-llama/Lama-3.1-8")
    msg = str(e.value)
    assert "meta-llama/Llama-3.1-8B" in msg and "config.json" in msg
    assert isinstance(e.value, PlanError)


def test_catalog_rows_are_sane():
    for hub_id, spec in MODEL_CATALOG.items():
        assert spec.source.startswith("https://huggingface.co/" + hub_id)
        assert spec.num_attention_heads % spec.num_key_value_heads == 0
        assert spec.lora_params(16, "all", include_experts=False) < spec.num_params / 50, hub_id


def test_models_command():
    from rayquant.cli import main

    res = CliRunner().invoke(main, ["models"])
    assert res.exit_code == 0, res.output
    assert "meta-llama/Llama-3.1-8B" in res.output and "Qwen/Qwen3-30B-A3B" in res.output
    res = CliRunner().invoke(main, ["models", "--filter", "QWEN3", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert rows and all("qwen3" in r["id"].lower() for r in rows)
    moe = next(r for r in rows if r["id"] == "Qwen/Qwen3-30B-A3B")
    assert moe["num_params"] == 30_532_122_624 and moe["num_experts"] == 128
    res = CliRunner().invoke(main, ["models", "--filter", "no-such-model"])
    assert res.exit_code != 0 and "no catalog model matches" in res.output
