"""`rayquant plan` / `rayquant estimate` through click's CliRunner."""

from __future__ import annotations

import json

import pytest

from click.testing import CliRunner

from planner.plan import TrainingPlan
from rayquant.cli import main

NODE_FIELDS = {"gpu", "nodes", "gpus_per_node", "quantization", "micro_batch_size",
               "gradient_accumulation_steps", "optimizer", "gradient_checkpointing", "placement",
               "peak_memory_bytes", "tokens_per_second", "reasons"}


def test_plan_json_fields_and_file(tmp_path):
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(main, ["plan", "--model", "meta-llama/Llama-3.1-8B", "--gpus",
                                  "2x8xH100-80GB,4x1xA10G", "--global-batch", "40", "--json",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["global_batch_size"] == 40 and data["num_workers"] == 20
    for node in data["node_plans"]:
        assert NODE_FIELDS <= set(node)
    assert json.loads(TrainingPlan.load(str(out)).to_json()) == data
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rayquant-")]


def test_plan_table_yaml_inventory_and_plot(tmp_path):
    inv = tmp_path / "inv.yaml"
    inv.write_text("- {gpu: A100-80GB, gpus_per_node: 2, count: 1}\n- {gpu: L4, count: 2}\n")
    png = tmp_path / "mem.png"
    r = CliRunner().invoke(main, ["plan", "-m", "Qwen/Qwen2.5-7B", "--inventory", str(inv),
                                  "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "A100-80GB:2" in r.output and "L4:1" in r.output and "Why:" in r.output
    assert "quantization:" in r.output and "activations" in r.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    y = CliRunner().invoke(main, ["plan", "-m", "Qwen/Qwen2.5-7B", "--gpus", "L4", "--yaml"])
    assert y.exit_code == 0 and "node_plans:" in y.output


def test_plan_errors_are_clear_without_traceback(tmp_path):
    runner = CliRunner()
    cases = [
        ["plan", "-m", "meta-llama/Llama-3.1-70B", "--gpus", "T4", "--seq-len", "8192"],
        ["plan", "-m", "no-such/model", "--gpus", "A10G"],
        ["plan", "-m", "meta-llama/Llama-3.1-8B", "--gpus", "2xH999"],
        ["plan", "-m", "meta-llama/Llama-3.1-8B"],
        ["plan", "-m", "meta-llama/Llama-3.1-8B", "--gpus", "L4", "--lora-targets", "q_proj,bogus"],
    ]
    for args in cases:
        r = runner.invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output and "Error:" in r.output
    bad = tmp_path / "inv.json"
    bad.write_text("{not json")
    r = runner.invoke(main, ["plan", "-m", "meta-llama/Llama-3.1-8B", "--inventory", str(bad)])
    assert r.exit_code == 2 and "not valid JSON" in r.output
    r = runner.invoke(main, ["plan", "-m", "meta-llama/Llama-3.1-70B", "--gpus", "T4"])
    assert "GiB more" in r.output and "To fix" in r.output


def test_estimate_json():
    r = CliRunner().invoke(main, ["estimate", "-m", "meta-llama/Llama-3.1-8B", "-g", "A10G",
                                  "--quantization", "nf4", "--seq-len", "2048", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert set(d["breakdown_bytes"]) == {"weights", "adapters", "gradients", "optimizer",
                                         "activations", "logits", "overhead"}
    assert d["peak_memory_bytes"] == sum(d["breakdown_bytes"].values())
    assert d["fits"] is True and d["max_seq_len"] > 2048 and d["tokens_per_second"] > 0
    big = CliRunner().invoke(main, ["estimate", "-m", "meta-llama/Llama-3.1-8B", "-g", "T4",
                                    "--quantization", "bf16", "--full-finetune",
                                    "--gradient-checkpointing", "none", "--json"])
    assert big.exit_code == 0 and json.loads(big.output)["fits"] is False
    table = CliRunner().invoke(main, ["estimate", "-m", "meta-llama/Llama-3.1-8B", "-g", "24GiB",
                                      "--lora-targets", "q_proj,v_proj", "--backend", "hf",
                                      "--gradient-checkpointing", "hf"])
    assert table.exit_code == 0 and "peak" in table.output and "fits:" in table.output
    bad = CliRunner().invoke(main, ["estimate", "-m", "meta-llama/Llama-3.1-8B", "-g", "T4",
                                    "--quantization", "nf4", "--full-finetune"])
    assert bad.exit_code == 2 and "16-bit" in bad.output


def test_plan_and_estimate_take_a_calibration_file(tmp_path):
    from planner.calibration import Calibration, Measurement

    m = Measurement(gpu="H100-80GB", quantization="nf4", model="meta-llama/Llama-3.1-8B", seq_len=2048,
                    micro_batch_size=1, predicted_peak_bytes=10 * 2**30,
                    predicted_allocated_bytes=9 * 2**30, measured_allocated_bytes=int(1.5 * 9 * 2**30),
                    measured_reserved_bytes=14 * 2**30, predicted_tokens_per_second=1000.0,
                    measured_tokens_per_second=500.0)
    path = tmp_path / "cal.json"
    Calibration((m,)).save(path)
    base_args = ["estimate", "-m", "meta-llama/Llama-3.1-8B", "-g", "H100-80GB", "--json"]
    base = json.loads(CliRunner().invoke(main, base_args).output)
    cal = json.loads(CliRunner().invoke(main, base_args + ["--calibration", str(path)]).output)
    assert cal["calibration"]["memory_factor"] == pytest.approx(1.5)
    assert cal["tokens_per_second"] == pytest.approx(base["tokens_per_second"] / 2)
    assert base["peak_memory_bytes"] < cal["peak_memory_bytes"] < 1.5 * base["peak_memory_bytes"]
    r = CliRunner().invoke(main, ["plan", "-m", "meta-llama/Llama-3.1-8B", "--gpus", "1x1xH100-80GB",
                                  "--quantization", "nf4", "--json", "--calibration", str(path)])
    assert r.exit_code == 0, r.output
    bad = CliRunner().invoke(main, ["plan", "-m", "meta-llama/Llama-3.1-8B", "--gpus", "H100-80GB",
                                    "--calibration", str(tmp_path / "missing.json")])
    assert bad.exit_code != 0 and "does not exist" in bad.output and "Traceback" not in bad.output


def test_plan_a_70b_model_on_four_single_a10g_nodes():
    # QLoRA + ZeRO-3 (issue 15): 4 x 24 GB hold Llama-3.3-70B only as 4-bit shards.
    args = ["plan", "--model", "meta-llama/Llama-3.3-70B-Instruct", "--gpus", "4x1xA10G"]
    r = CliRunner().invoke(main, args + ["--json"])  # at the default 2048 tokens
    assert r.exit_code == 0, r.output
    node = json.loads(r.output)["node_plans"][0]
    assert (node["placement"], node["backend"], node["quantization"]) == ("zero3", "hf", "dynamic-4bit")
    assert "QLoRA + ZeRO-3" in node["reasons"]["quantization"]
    # At 4096 tokens it misses: exit 2, the sharded need and a length that fits, no traceback.
    r = CliRunner().invoke(main, args + ["--seq-len", "4096"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "ZeRO-3 over 4 GPUs" in r.output and "--seq-len" in r.output and "fits)" in r.output


def test_estimate_compare_every_quantization_and_backend(tmp_path):
    from planner.vocab import BACKENDS, QUANTIZATIONS

    args = ["estimate", "-m", "meta-llama/Llama-3.1-8B", "-g", "L4", "--seq-len", "4096", "--compare"]
    r = CliRunner().invoke(main, args + ["--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)  # one document
    pairs = {(row["quantization"], row["backend"]) for row in doc["rows"]}
    assert pairs == {(q, b) for q in QUANTIZATIONS for b in BACKENDS}
    by = {(row["quantization"], row["backend"]): row for row in doc["rows"]}
    assert not by["fp8", "hf"]["available"] and "no FP8 path" in by["fp8", "hf"]["reason"]
    nf4, bf16 = by["nf4", "unsloth"], by["bf16", "unsloth"]
    assert nf4["peak_memory_bytes"] < bf16["peak_memory_bytes"]
    assert nf4["max_seq_len"] > bf16["max_seq_len"] and nf4["tokens_per_second"] > 0
    assert by["nf4", "unsloth"]["max_seq_len"] > by["nf4", "hf"]["max_seq_len"]  # offload vs kept inputs
    assert by["dynamic-4bit", "unsloth"]["protected_bytes"] > 0
    for row in doc["rows"]:
        if row["available"]:
            assert row["fits"] == (row["peak_memory_bytes"] <= doc["gpu_memory_bytes"])
    # The same rows, one line each, in the table.
    text = CliRunner().invoke(main, args).output
    assert "longest seq" in text and text.count("dynamic-4bit") == 2

    # --plot: a PNG written atomically, replaced only when it is our own plot and --overwrite is given.
    png = tmp_path / "compare.png"
    r = CliRunner().invoke(main, args + ["--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert png.read_bytes().startswith(b"\x89PNG")
    again = CliRunner().invoke(main, args + ["--plot", str(png)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(main, args + ["--plot", str(png), "--overwrite"]).exit_code == 0
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"a user's picture")
    r = CliRunner().invoke(main, args + ["--plot", str(mine), "--overwrite"])
    assert r.exit_code == 2 and mine.read_bytes() == b"a user's picture"
    r = CliRunner().invoke(main, args[:-1] + ["--plot", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "--compare" in r.output
    assert not (tmp_path / "x.png").exists()


def test_plan_refuses_a_node_without_the_host_ram_the_offload_needs(tmp_path):
    inv = tmp_path / "inv.yaml"
    inv.write_text("- {gpu: H100-80GB, gpus_per_node: 8, count: 1, host_memory_gib: 32}\n")
    args = ["plan", "-m", "meta-llama/Llama-3.1-8B", "--inventory", str(inv), "--seq-len", "32768",
            "--global-batch", "8", "--quantization", "nf4"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert "host RAM" in r.output and "32.0 GiB" in r.output and "--backend hf" in r.output
    assert "Traceback" not in r.output
    inv.write_text("- {gpu: H100-80GB, gpus_per_node: 8, count: 1, host_memory_gib: 2048}\n")
    assert CliRunner().invoke(main, args).exit_code == 0
