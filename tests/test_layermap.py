"""planner.layermap.layer_device_map as a pure function."""

from __future__ import annotations

import pytest

from planner.architecture import ModelSpec
from planner.layermap import bytes_per_gpu, layer_device_map
from planner.plan import PlanError

MODEL = ModelSpec.from_config(dict(model_type="llama", hidden_size=512, intermediate_size=1536,
                                   num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                                   vocab_size=4096), name="m")


def sizes(layer=10, embed=5, head=7):
    out = {f"model.layers.{i}": layer for i in range(8)}
    out.update({"model.embed_tokens": embed, "model.rotary_emb": 0, "model.norm": 1, "lm_head": head})
    return out


def test_edges_and_balance():
    m = layer_device_map(MODEL, sizes(), [60, 60])
    assert m["model.embed_tokens"] == 0 and m["model.rotary_emb"] == 0
    assert m["lm_head"] == 1 and m["model.norm"] == 1
    layers = [m[f"model.layers.{i}"] for i in range(8)]
    assert layers == sorted(layers)  # contiguous runs
    assert layers.count(0) == 4 and layers.count(1) == 4
    per = bytes_per_gpu(m, sizes(), 2)
    assert all(b <= 60 for b in per) and sum(per) == sum(sizes().values())


def test_never_over_budget_with_unequal_gpus():
    budgets = [100, 30, 40]
    m = layer_device_map(MODEL, sizes(), budgets)
    per = bytes_per_gpu(m, sizes(), 3)
    assert all(b <= cap for b, cap in zip(per, budgets))
    assert set(m) == set(sizes())


def test_single_gpu_holds_everything():
    m = layer_device_map(MODEL, sizes(), [200])
    assert set(m.values()) == {0}


def test_impossible_raises_with_shortfall():
    with pytest.raises(PlanError, match="short"):
        layer_device_map(MODEL, sizes(), [40, 40])
    # Enough bytes in total, but whole layers cannot be packed into the rooms left.
    with pytest.raises(PlanError, match="cannot be split"):
        layer_device_map(MODEL, sizes(layer=25), [110, 105])


def test_missing_modules_named():
    bad = sizes()
    del bad["model.layers.3"]
    with pytest.raises(PlanError, match="model.layers.3"):
        layer_device_map(MODEL, bad, [100, 100])
