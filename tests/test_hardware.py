"""The GPU catalog, GPU lookups, GPU specs and inventory rows."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from planner.hardware import (
    CPU_DEVICE,
    GIB,
    GPU_CATALOG,
    MIB,
    NodeType,
    AmbiguousGpuError,
    UnknownGpuError,
    cpu_device,
    fp8_path_for,
    lookup_gpu,
    node_types_from_dicts,
    parse_gpu_spec,
)
from planner.plan import PlanError

REQUIRED = ("T4", "V100-16GB", "V100-32GB", "A10", "A10G", "L4", "L40S", "RTX-3090", "RTX-4090",
            "RTX-A6000", "A100-40GB", "A100-40GB-PCIe", "A100-80GB", "A100-80GB-PCIe", "H100-80GB",
            "H100-PCIe", "H100-NVL", "H200", "GH200", "B200")


def test_catalog_has_every_required_gpu_with_sourced_sane_figures():
    names = [g.name for g in GPU_CATALOG]
    assert len(names) == len(set(names))
    assert set(REQUIRED) <= set(names)
    for g in GPU_CATALOG:
        assert g.source, g.name
        assert g.nvml_names, g.name
        assert 14 * GIB < g.memory_bytes < 200 * GIB, g.name
        assert g.fp16_tflops > 0 and g.bandwidth_gb_per_s > 0, g.name
        # bf16 tensor cores exist exactly from Ampere (8.0) on; FP8 from Ada/Hopper (8.9) on.
        assert (g.bf16_tflops > 0) == g.supports_bf16, g.name
        assert (g.fp8_tflops is not None) == g.supports_fp8, g.name
        if g.fp8_tflops is not None:
            assert g.fp8_tflops > g.bf16_tflops, g.name


def test_memory_is_what_nvml_reports():
    # nvidia-smi totals (MiB) from public logs: the planner's budget starts from these.
    assert lookup_gpu("H100-80GB").memory_bytes == 81559 * MIB
    assert lookup_gpu("A10G").memory_bytes == 23028 * MIB
    assert lookup_gpu("H200").memory_bytes == 143771 * MIB
    assert lookup_gpu("T4").memory_bytes == 15360 * MIB


@pytest.mark.parametrize("text,name", [
    ("H100-80GB", "H100-80GB"), ("h100_80gb", "H100-80GB"), ("H100 80GB", "H100-80GB"),
    ("NVIDIA H100 80GB HBM3", "H100-80GB"), ("NVIDIA A10G", "A10G"), ("a10g", "A10G"),
    ("A100-40GB", "A100-40GB"), ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
    ("NVIDIA A100 80GB PCIe", "A100-80GB-PCIe"), ("RTX-4090", "RTX-4090"),
    ("NVIDIA GeForce RTX 4090", "RTX-4090"), ("rtx 3090", "RTX-3090"), ("L4", "L4"),
    ("NVIDIA L4", "L4"), ("Tesla T4", "T4"), ("Tesla V100-SXM2-32GB", "V100-32GB"),
    ("NVIDIA GH200 480GB", "GH200"), ("NVIDIA H100 NVL", "H100-NVL"), ("NVIDIA A10", "A10"),
])
def test_lookup_by_catalog_name_or_nvml_name(text, name):
    assert lookup_gpu(text).name == name


def test_every_nvml_name_resolves_to_its_row():
    for g in GPU_CATALOG:
        for n in g.nvml_names:
            assert lookup_gpu(n) is g
        assert lookup_gpu(g.name) is g


@pytest.mark.parametrize("text,gib", [("24GiB", 24), ("80GB", 80), ("48G", 48), ("16 GiB", 16)])
def test_bare_size_is_a_generic_gpu(text, gib):
    g = lookup_gpu(text)
    assert g.generic and g.memory_bytes == gib * GIB
    assert g.name == f"GPU-{gib}GiB"
    assert g.compute_capability == (8, 0) and g.supports_bf16 and not g.supports_fp8
    assert "assumed" in g.source
    assert lookup_gpu(g.name) == g  # the generic name reads back


def test_unknown_gpu_names_closest_and_the_listing_command():
    with pytest.raises(UnknownGpuError) as e:
        lookup_gpu("H1OO-80GB")
    msg = str(e.value)
    assert "H100-80GB" in msg and "rayquant gpus" in msg
    assert isinstance(e.value, PlanError)
    with pytest.raises(UnknownGpuError):
        lookup_gpu("")


def test_cpu_device():
    cpu = cpu_device(32 * GIB)
    assert cpu.name == CPU_DEVICE == "CPU" and cpu.is_cpu and cpu.memory_bytes == 32 * GIB
    assert not any(g.is_cpu for g in GPU_CATALOG)
    assert cpu.compute_capability == (0, 0)
    assert not cpu.supports_bf16 and not cpu.supports_fp8 and cpu.fp8_tflops is None
    assert 0 < cpu.tflops_16bit < 5
    nt = NodeType(gpu=cpu, gpus_per_node=2, count=1, host_memory_bytes=32 * GIB)
    assert nt.key == "CPU:2" and nt.num_gpus == 2
    assert lookup_gpu("cpu").is_cpu and lookup_gpu("cpu").memory_bytes > 0


def test_fp8_path_by_compute_capability():
    assert fp8_path_for((9, 0)) == fp8_path_for((10, 0)) == fp8_path_for((12, 0)) == "unsloth"
    assert fp8_path_for((8, 9)) == "rowwise"
    assert fp8_path_for((8, 6)) is fp8_path_for((8, 0)) is fp8_path_for((7, 5)) is None
    assert fp8_path_for(cpu_device(GIB).compute_capability) is None
    # supports_fp8 is the same rule: FP8 tensor cores exactly where some FP8 path runs.
    for g in GPU_CATALOG:
        assert g.supports_fp8 == (fp8_path_for(g.compute_capability) is not None), g.name
    assert fp8_path_for(lookup_gpu("H100-80GB").compute_capability) == "unsloth"
    assert fp8_path_for(lookup_gpu("L4").compute_capability) == "rowwise"
    assert fp8_path_for(lookup_gpu("A100-80GB").compute_capability) is None


def test_parse_gpu_spec_forms_and_merging():
    nts = parse_gpu_spec("2x8xH100-80GB,4x1xA10G")
    assert [(n.gpu.name, n.gpus_per_node, n.count) for n in nts] == [("H100-80GB", 8, 2),
                                                                      ("A10G", 1, 4)]
    (one,) = parse_gpu_spec("8xH100-80GB")
    assert (one.gpus_per_node, one.count) == (8, 1)
    (single,) = parse_gpu_spec("A10G")
    assert (single.gpus_per_node, single.count) == (1, 1)
    (merged,) = parse_gpu_spec("2x8xH100-80GB, 1x8xNVIDIA H100 80GB HBM3")
    assert merged.count == 3 and merged.key == "H100-80GB:8"
    different = parse_gpu_spec("1x8xH100-80GB,1x4xH100-80GB")
    assert [n.key for n in different] == ["H100-80GB:8", "H100-80GB:4"]
    (generic,) = parse_gpu_spec("3x2x24GiB")
    assert generic.gpu.generic and generic.num_gpus == 6


@pytest.mark.parametrize("bad", ["", "2x8x", "8x", "2x8x3xA10G", "a10g,,l4", "0x1xA10G",
                                 "2x0xA10G", "12"])
def test_parse_gpu_spec_bad_syntax_says_the_form(bad):
    with pytest.raises(PlanError) as e:
        parse_gpu_spec(bad)
    assert "2x8xH100-80GB,4x1xA10G" in str(e.value)


def test_parse_gpu_spec_unknown_gpu():
    with pytest.raises(UnknownGpuError) as e:
        parse_gpu_spec("2x8xH100-80GB,4x1xA10X")
    assert "A10G" in str(e.value)


def test_node_types_from_dicts():
    rows = [{"gpu": "A10G", "gpus_per_node": 1, "count": 4, "host_memory_gib": 64, "cpus": 16},
            {"gpu": "NVIDIA H100 80GB HBM3", "gpus_per_node": 8},
            {"gpu": "CPU", "gpus_per_node": 2, "host_memory_gib": 24}]
    a10g, h100, cpu = node_types_from_dicts(rows)
    assert (a10g.count, a10g.host_memory_bytes, a10g.cpus_per_node) == (4, 64 * GIB, 16)
    assert (h100.gpu.name, h100.gpus_per_node, h100.count) == ("H100-80GB", 8, 1)
    assert cpu.gpu.is_cpu and cpu.gpu.memory_bytes == 24 * GIB
    (merged,) = node_types_from_dicts([{"gpu": "L4", "count": 2}, {"gpu": "l4", "count": 3}])
    assert merged.count == 5
    assert node_types_from_dicts({"nodes": [{"gpu": "L4"}]})[0].gpu.name == "L4"


def test_node_types_from_dicts_reports_every_problem_with_row_and_field():
    rows = [{"gpu": "A10G", "count": 0}, {"gpus_per_node": 2}, {"gpu": "Z9000"},
            {"gpu": "L4", "colour": "red"}, "A10G"]
    with pytest.raises(PlanError) as e:
        node_types_from_dicts(rows)
    msg = str(e.value)
    assert "row 1: field 'count'" in msg
    assert "row 2: field 'gpu'" in msg
    assert "row 3: field 'gpu'" in msg and "unknown GPU 'Z9000'" in msg
    assert "row 4: unknown field(s) colour" in msg
    assert "row 5" in msg
    with pytest.raises(PlanError):
        node_types_from_dicts([])


def test_gpus_command_lists_the_catalog():
    from rayquant.cli import main

    res = CliRunner().invoke(main, ["gpus"])
    assert res.exit_code == 0, res.output
    for name in REQUIRED:
        assert name in res.output
    assert "CPU" in res.output
    res = CliRunner().invoke(main, ["gpus", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    h100 = rows["H100-80GB"]
    assert h100["compute_capability"] == "9.0" and h100["fp8"] and h100["bf16"]
    assert h100["memory_bytes"] == 81559 * MIB and h100["nvml_names"] == ["NVIDIA H100 80GB HBM3"]
    assert rows["T4"]["bf16"] is False and rows["T4"]["fp8_tflops"] is None


def test_catalog_commands_import_neither_torch_nor_ray():
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from rayquant.cli import main; "
            "r = [CliRunner().invoke(main, c).exit_code for c in (['gpus'], ['models'])]; "
            "print(r, sorted(m for m in ('torch', 'ray', 'transformers', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[0, 0] []", out.stdout + out.stderr


@pytest.mark.parametrize("name, choices", [
    ("A100", ("A100-40GB", "A100-80GB")), ("a100-sxm", ("A100-40GB", "A100-80GB")),
    ("V100", ("V100-16GB", "V100-32GB")), ("H100", ("H100-80GB", "H100-PCIe", "H100-NVL")),
    ("A6000", ("RTX-A6000", "RTX-6000-Ada")), ("RTX 6000", ("RTX-A6000", "RTX-6000-Ada"))])
def test_ambiguous_gpu_names_are_refused_with_the_choices(name, choices):
    with pytest.raises(AmbiguousGpuError) as e:
        lookup_gpu(name)
    msg = str(e.value)
    assert isinstance(e.value, PlanError) and "To fix: write" in msg
    assert all(c in msg for c in choices)
    with pytest.raises(AmbiguousGpuError):
        parse_gpu_spec(f"4x{name}")
    with pytest.raises(PlanError, match="To fix: write"):
        node_types_from_dicts([{"gpu": name, "count": 2}])


def test_ambiguous_names_say_exactly_what_to_write():
    with pytest.raises(AmbiguousGpuError) as e:
        parse_gpu_spec("4xA100")
    assert str(e.value).endswith("To fix: write A100-40GB or A100-80GB.")


def test_real_memory_decides_an_ambiguous_name():
    # What live inventory passes: the memory NVML reports for the GPU.
    assert lookup_gpu("A100", 40 * GIB).name == "A100-40GB"
    assert lookup_gpu("A100", int(79.2 * GIB)).name == "A100-80GB"
    assert lookup_gpu("V100", 32 * GIB).name == "V100-32GB"
    # Two variants with the same memory: the slower one (the plan's speed is not overstated).
    assert lookup_gpu("H100", int(79.6 * GIB)).name == "H100-PCIe"
    assert lookup_gpu("H100", 94 * GIB).name == "H100-NVL"
    # A memory that fits none of them does not pick one.
    with pytest.raises(AmbiguousGpuError):
        lookup_gpu("A100", 24 * GIB)


def test_ambiguous_gpu_on_the_command_line_exits_2():
    from rayquant.cli import main
    r = CliRunner().invoke(main, ["plan", "-m", "meta-llama/Llama-3.1-8B", "--gpus", "4xA100"])
    assert r.exit_code == 2, r.output
    assert "To fix: write A100-40GB or A100-80GB" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["estimate", "-m", "meta-llama/Llama-3.1-8B", "-g", "V100"])
    assert r.exit_code == 2 and "V100-16GB or V100-32GB" in r.output
