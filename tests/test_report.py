"""Renderings of plans for the console."""

from __future__ import annotations

from rayquant.report import GIB, gib, table


def test_gib_keeps_small_values_readable():
    assert gib(80 * GIB) == "80.00" and gib(1.234 * GIB, 1) == "1.2" and gib(0) == "0.00"
    # A tiny model's few megabytes must not print as 0.00 GiB.
    assert gib(3_000_000) == "0.0028" and gib(6.1e-5 * GIB) == "0.000061"


def test_table_aligns_columns():
    text = table(["name", "GiB"], [["a", "1.00"], ["long name", "10.00"]], right={1})
    lines = text.splitlines()
    assert lines[0] == "name         GiB" and lines[-1] == "long name  10.00"
    assert len({len(line) for line in lines}) == 1


def test_a_cpu_plan_does_not_claim_the_gpu_models_error():
    from planner.hardware import parse_gpu_spec
    from planner.plan import JobSpec
    from planner.search import make_plan
    from planner.throughput import expected_error_text
    from rayquant.report import plan_table

    job = JobSpec(seq_len=128, global_batch_size=8)
    cpu = plan_table(make_plan("meta-llama/Llama-3.2-1B", parse_gpu_spec("1x2xCPU"), job))
    gpu = plan_table(make_plan("meta-llama/Llama-3.1-8B", parse_gpu_spec("1x1xA10G"), job))
    assert "CPU workers train far slower" in cpu and expected_error_text() not in cpu.splitlines()[1]
    assert f"({expected_error_text()}: the model's median error" in gpu
