"""GPU checks (marker `gpu`, skipped without CUDA): the real FP8 paths, dynamic 4-bit through Unsloth's
GPU loader, and a calibration measurement that yields a valid calibration file."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rowwise_fp8_linear_on_gpu_matches_bf16():
    from rayquant.fp8 import Fp8RowwiseLinear, scaled_mm_rowwise_supported

    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 2048, bias=True, device=device, dtype=torch.bfloat16)
    fp8 = Fp8RowwiseLinear.from_linear(lin)
    x = torch.randn(4, 64, 1024, device=device, dtype=torch.bfloat16, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    ref, out = lin(xr), fp8(x)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    assert _rel(out, ref) < 0.06 and _rel(x.grad, xr.grad) < 0.05
    if torch.cuda.get_device_capability(0) >= (9, 0):
        assert scaled_mm_rowwise_supported(device)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability(0) < (9, 0),
                    reason="Unsloth load_in_fp8 needs compute capability >= 9.0")
def test_unsloth_load_in_fp8_trains_lora(tiny_llama_dir):
    from rayquant.fp8 import unsloth_fp8_problems

    problems = unsloth_fp8_problems()
    if problems:
        pytest.skip("; ".join(problems))
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), max_seq_length=64,
                                                 load_in_fp8=True, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=8, target_modules=["q_proj", "v_proj"])
    ids = torch.randint(0, 200, (2, 32), device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_dynamic_4bit_protected_modules_stay_16bit_on_gpu(tiny_llama_dir):
    import bitsandbytes as bnb
    from unsloth import FastLanguageModel

    from rayquant.dynamic4bit import bnb_quantization_config, restore_protected_modules

    protected = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    model, _ = FastLanguageModel.from_pretrained(
        str(tiny_llama_dir), max_seq_length=64, dtype=torch.bfloat16,
        quantization_config=bnb_quantization_config(protected, torch.bfloat16))
    # Unsloth's GPU loader honours the skip list: nothing to restore afterwards.
    assert restore_protected_modules(model, tiny_llama_dir, protected) == []
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in protected)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.k_proj"), bnb.nn.Linear4bit)


def test_calibration_measurement_on_gpu(tmp_path, tiny_llama_dir):
    from rayquant.calibrate import CalibrationCase, calibration_from, run_cases

    results = run_cases([CalibrationCase(str(tiny_llama_dir), "nf4", 64, 2),
                         CalibrationCase(str(tiny_llama_dir), "bf16", 64, 2)], tmp_path, steps=2)
    assert all(r["status"] == "ok" for r in results), [r.get("error") for r in results]
    assert all(r["measured_reserved_bytes"] >= r["measured_allocated_bytes"] > 0 for r in results)
    cal = calibration_from(results)
    cal.save(tmp_path / "c.json")
    assert len(cal.measurements) == 2
