"""planner.tensor_bytes: per-tensor byte counts, checked against what bitsandbytes allocates on CPU."""

from __future__ import annotations

import pytest

from planner.tensor_bytes import (BNB_QMAP_BYTES, adamw_8bit_state_bytes, fp8_rowwise_bytes, nf4_bytes,
                                  nf4_tensor_bytes, sixteen_bit_bytes)


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def test_nf4_bits_per_param_match_qlora_paper():
    n = 4096 * 4096
    assert nf4_tensor_bytes(n, double_quant=False) * 8 / n == pytest.approx(4.5, abs=0.001)
    assert nf4_tensor_bytes(n, double_quant=True) * 8 / n == pytest.approx(4.127, abs=0.001)


@pytest.mark.parametrize("shape", [(64, 64), (128, 96), (512, 256), (4096, 64), (3, 7)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_match_bitsandbytes_quant_state(shape, double_quant):
    torch = pytest.importorskip("torch")
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(*shape, dtype=torch.bfloat16)
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    data = _nbytes(q) + _nbytes(state.absmax)
    constants = _nbytes(state.code)
    if double_quant:
        data += _nbytes(state.state2.absmax)
        constants += _nbytes(state.state2.code) + _nbytes(state.offset)
    assert nf4_bytes(w.numel(), double_quant) == data
    assert nf4_tensor_bytes(w.numel(), double_quant) == data + constants


@pytest.mark.parametrize("numel", [1, 4095, 4096, 65_539])
def test_adamw_8bit_state_bytes_match_bitsandbytes(numel):
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    p = torch.nn.Parameter(torch.randn(numel))
    opt = bnb.optim.AdamW8bit([p])
    p.grad = torch.randn(numel)
    opt.step()
    state = {k: v for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim() > 0}
    qmaps = [state.pop(k) for k in ("qmap1", "qmap2") if k in state]  # shared by all parameters
    assert sum(map(_nbytes, state.values())) == adamw_8bit_state_bytes(numel)
    assert not qmaps or sum(map(_nbytes, qmaps)) == BNB_QMAP_BYTES


def test_adamw_8bit_small_tensor_rule():
    assert adamw_8bit_state_bytes(4095) == 8 * 4095  # below min_8bit_size: two fp32 states
    assert adamw_8bit_state_bytes(4096) == 2 * 4096 + 2 * 4 * 16
    assert adamw_8bit_state_bytes(1 << 20) / (1 << 20) == pytest.approx(2.03, abs=0.01)


def test_fp8_rowwise_bytes_match_rayquants_fp8_linear():
    torch = pytest.importorskip("torch")
    from rayquant.fp8 import Fp8RowwiseLinear, fp8_weight_bytes

    layer = Fp8RowwiseLinear.from_linear(torch.nn.Linear(96, 32, bias=False, dtype=torch.bfloat16))
    assert fp8_weight_bytes(torch.nn.Sequential(layer)) == fp8_rowwise_bytes(96, 32)
    sixteen = torch.nn.Linear(96, 32, bias=False, dtype=torch.bfloat16)
    assert sixteen_bit_bytes(96 * 32) == _nbytes(sixteen.weight)
