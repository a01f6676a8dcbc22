"""Calibration files (format, factors, errors), their effect on plans, and the measuring pipeline on CPU."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import subprocess
import sys

import pytest

from planner.calibration import Calibration, CalibrationError, Measurement

GIB = 2**30


def _m(gpu="H100-80GB", q="nf4", alloc_ratio=1.0, tps_ratio=1.0, **kw) -> Measurement:
    predicted = 10 * GIB
    fields = dict(gpu=gpu, quantization=q, model="meta-llama/Llama-3.2-1B", seq_len=2048,
                  micro_batch_size=2, predicted_peak_bytes=predicted + GIB,
                  predicted_allocated_bytes=predicted,
                  measured_allocated_bytes=int(predicted * alloc_ratio),
                  measured_reserved_bytes=int(predicted * alloc_ratio * 1.05),
                  predicted_tokens_per_second=1000.0, measured_tokens_per_second=1000.0 * tps_ratio,
                  gpu_nvml_name="NVIDIA H100 80GB HBM3" if gpu == "H100-80GB" else "")
    fields.update(kw)
    return Measurement(**fields)


def test_factors_memory_worst_case_throughput_geometric_mean():
    cal = Calibration((_m(alloc_ratio=1.1, tps_ratio=0.5), _m(alloc_ratio=1.3, tps_ratio=2.0),
                       _m(q="bf16", alloc_ratio=0.9, tps_ratio=0.8)))
    assert cal.memory_factor("H100-80GB", "nf4") == pytest.approx(1.3, rel=1e-6)
    assert cal.throughput_factor("H100-80GB", "nf4") == pytest.approx(1.0)  # sqrt(0.5 * 2)
    assert cal.memory_factor("H100-80GB", "bf16") == pytest.approx(0.9, rel=1e-6)
    # The NVML name, case and dashes do not matter; other GPUs and schemes are uncalibrated.
    assert cal.memory_factor("NVIDIA H100 80GB HBM3", "nf4") == pytest.approx(1.3, rel=1e-6)
    assert cal.memory_factor("h100 80gb", "nf4") == pytest.approx(1.3, rel=1e-6)
    assert cal.memory_factor("A10G", "nf4") == 1.0
    assert cal.throughput_factor("H100-80GB", "fp8") == 1.0
    # A measurement without a tokens/s prediction does not move the throughput factor.
    only_mem = Calibration((_m(predicted_tokens_per_second=0.0, tps_ratio=3.0),))
    assert only_mem.throughput_factor("H100-80GB", "nf4") == 1.0


def test_calibrated_peak_scales_only_what_the_allocator_holds():
    from planner.calibration import calibrated_peak_bytes
    from planner.memory import MemoryEstimate
    from planner.plan import MemoryBreakdown

    est = MemoryEstimate(breakdown=MemoryBreakdown(1000, 0, 0, 0, 0, 0, 300), peak_bytes=1300,
                         host_bytes=0, capacity_bytes=10**4, trainable_params=0, module_bytes={},
                         context_bytes=200, slack_bytes=100)
    assert est.allocated_bytes == 1000
    assert calibrated_peak_bytes(est, 1.0) == 1300
    assert calibrated_peak_bytes(est, 1.5) == 300 + 1500  # context and slack stay as predicted
    assert calibrated_peak_bytes(est, 1.0001) == 300 + 1001  # rounded up, never down
    assert calibrated_peak_bytes(est, 2.0, peak_bytes=1100) == 300 + 1600  # a layer map's busiest GPU


def test_round_trip_is_atomic_and_lossless(tmp_path):
    cal = Calibration((_m(alloc_ratio=1.2), _m(gpu="A10G", q="dynamic-4bit", tps_ratio=0.7)),
                      created="2026-01-01T00:00:00Z", environment={"torch": "2.11.0"})
    path = tmp_path / "sub" / "calibration.json"
    cal.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["calibration.json"]
    back = Calibration.load(path)
    assert back == cal
    data = json.loads(path.read_text())
    assert data["format"] == "rayquant-calibration" and data["version"] == 1
    factors = {(f["gpu"], f["quantization"]): f for f in data["factors"]}
    assert factors[("H100-80GB", "nf4")]["memory_factor"] == pytest.approx(1.2, rel=1e-6)
    merged = back.merged(Calibration((_m(gpu="L4", q="fp8", alloc_ratio=1.5),)))
    assert merged.gpus() == ("A10G", "H100-80GB", "L4")
    assert merged.memory_factor("L4", "fp8") == pytest.approx(1.5, rel=1e-6)


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"measurements": []}), "not a rayquant calibration file"),
    (json.dumps({"format": "rayquant-calibration", "version": 99, "measurements": []}), "version 99"),
    (json.dumps({"format": "rayquant-calibration", "version": 1, "measurements": {}}), "must be a list"),
])
def test_bad_files_give_clear_errors(tmp_path, content, match):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=match) as err:
        Calibration.load(path)
    assert "To fix" in str(err.value) or "regenerate" in str(err.value)


def test_bad_measurements_are_all_reported_at_once(tmp_path):
    good = dataclasses.asdict(_m())
    rows = [{k: v for k, v in good.items() if k != "seq_len"}, {**good, "colour": "red"}]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": "rayquant-calibration", "version": 1, "measurements": rows}))
    with pytest.raises(CalibrationError) as err:
        Calibration.load(path)
    assert "measurement 0 lacks seq_len" in str(err.value)
    assert "measurement 1 has unknown fields colour" in str(err.value)
    for bad, match in ((dict(quantization="int3"), "int3"), (dict(measured_allocated_bytes=-5), "positive"),
                       (dict(measured_allocated_bytes=200 * GIB), "outside"),
                       (dict(measured_tokens_per_second=math.nan), "number >= 0")):
        with pytest.raises(CalibrationError, match=match):
            Calibration.from_dict({"format": "rayquant-calibration", "version": 1,
                                   "measurements": [{**good, **bad}]})
    with pytest.raises(CalibrationError, match="does not exist"):
        Calibration.load(tmp_path / "missing.json")


def test_planner_calibration_imports_no_heavy_module():
    code = ("import sys, planner.calibration; "
            "print([m for m in ('torch', 'ray', 'transformers', 'yaml') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_memory_calibration_makes_plans_smaller():
    from planner.hardware import parse_gpu_spec
    from planner.plan import JobSpec
    from planner.search import make_plan

    nodes = parse_gpu_spec("1x1xA10G")
    job = JobSpec(seq_len=2048, global_batch_size=16)
    base = make_plan("meta-llama/Llama-3.1-8B", nodes, job).node_plans[0]
    gpu = base.gpu
    heavier = Calibration((_m(gpu=gpu, q=base.quantization, alloc_ratio=1.3),))
    calibrated = make_plan("meta-llama/Llama-3.1-8B", nodes, job, calibration=heavier).node_plans[0]
    bits = {"nf4": 4, "dynamic-4bit": 4, "fp8": 8, "bf16": 16, "fp16": 16}
    smaller = (calibrated.micro_batch_size < base.micro_batch_size
               or bits[calibrated.quantization] < bits[base.quantization]
               or calibrated.gradient_checkpointing != base.gradient_checkpointing
               or calibrated.optimizer != base.optimizer
               # same choices, less spare memory for dynamic 4-bit's 16-bit modules
               or calibrated.protected_budget_bytes < base.protected_budget_bytes)
    assert smaller, (base, calibrated)
    # Dynamic 4-bit's peak includes the 16-bit modules bought with what is left under the budget,
    # so compare the peaks before that purchase (the budget less what was left for it).
    def before_protection(p):
        return (p.memory_budget_bytes - p.protected_budget_bytes if p.quantization == "dynamic-4bit"
                else p.peak_memory_bytes)

    assert before_protection(calibrated) > before_protection(base)
    # What the plan now predicts includes the measured excess and still fits its budget.
    assert calibrated.peak_memory_bytes <= calibrated.memory_budget_bytes


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU refusal")
def test_calibrate_without_cuda_says_so_and_fails():
    from click.testing import CliRunner

    from rayquant.cli import main

    result = CliRunner().invoke(main, ["calibrate", "--model", "Qwen/Qwen2.5-0.5B"])
    assert result.exit_code != 0
    assert "no CUDA GPU" in result.output and "To fix" in result.output
    bad = CliRunner().invoke(main, ["calibrate", "--model", "Qwen/Qwen9-0.5B"])
    assert bad.exit_code != 0 and "Qwen/Qwen2.5-0.5B" in bad.output and "Traceback" not in bad.output


def test_measuring_pipeline_on_cpu_records_quantization_in_the_manifest_fields(tmp_path):
    """The calibrate path end to end on CPU: the worker's loader with dynamic 4-bit and row-wise FP8."""
    from rayquant.calibrate import CalibrationCase, calibration_from, format_table, run_cases
    from rayquant.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny4", arch="llama", num_hidden_layers=4)
    cases = [CalibrationCase(str(model), "dynamic-4bit", 32, 2, gradient_checkpointing="none"),
             CalibrationCase(str(model), "fp8", 32, 2, gradient_checkpointing="none")]
    results = run_cases(cases, tmp_path / "work", steps=1)
    assert [r["status"] for r in results] == ["ok", "ok"], [r.get("error") for r in results]
    dyn, fp8 = (r["loaded"] for r in results)
    assert 0 < dyn["protected_cost_bytes"] <= dyn["protected_budget_bytes"]
    assert dyn["protected_modules"] and dyn["linear4bit_modules"] == 4 * 7 - len(dyn["protected_modules"])
    assert fp8["fp8_path"] == "rowwise" and fp8["fp8_modules"] == 4 * 7
    for r in results:
        assert r["predicted_allocated_bytes"] > 0 and r["measured_tokens_per_second"] > 0
        assert all(math.isfinite(x) for x in r["losses"])
    # CPU runs measure no GPU memory, so they never become calibration data.
    assert calibration_from(results).measurements == ()
    assert "dynamic-4bit" in format_table(results)
    # Once the time budget is spent, the remaining cases are recorded as skipped, not run.
    budget_spent = run_cases(cases, tmp_path / "work", steps=1, budget_s=1e-9)
    assert budget_spent[-1]["status"] == "skipped" and "budget" in budget_spent[-1]["error"]
