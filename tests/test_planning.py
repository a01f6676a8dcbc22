"""rayquant.planning and rayquant.models: the planning service every face uses, light at import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from planner.hardware import cpu_device, NodeType
from planner.model import UnknownModelError
from rayquant import planning
from rayquant.config import LoraOptions, SftOptions
from rayquant.models import config_path, model_problems, tiny_arch

HEAVY = ("torch", "ray", "yaml", "transformers", "numpy")


def test_the_faces_and_services_import_nothing_heavy():
    code = ("import sys, rayquant.cli, rayquant.cli.errors, rayquant.planning, rayquant.cluster, "
            "rayquant.models, rayquant.k8s, rayquant.config, rayquant.report\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_job_spec_takes_the_options_with_one_alpha_default():
    job = planning.job_spec(LoraOptions(rank=4, targets="q_proj,v_proj"), SftOptions(seq_len=64, optimizer="adamw_torch"),
                            safety_margin=0.2)
    assert (job.lora_rank, job.lora_alpha, job.lora_targets) == (4, 4, ("q_proj", "v_proj"))
    assert (job.seq_len, job.optimizer, job.safety_margin) == (64, "adamw_torch", 0.2)
    assert planning.job_spec(LoraOptions(rank=4, alpha=32), SftOptions()).lora_alpha == 32


def test_tiny_ids_plan_from_their_config_without_building_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYQUANT_CACHE", str(tmp_path / "cache"))
    assert tiny_arch("rayquant/tiny-qwen2") == "qwen2" and tiny_arch("Qwen/Qwen2.5-7B") is None
    assert config_path("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"
    plan = planning.make_plan("rayquant/tiny-llama", planning.node_types(gpus="2x1xCPU"),
                              planning.job_spec(LoraOptions(), SftOptions(seq_len=64, global_batch_size=4)))
    assert plan.model == "rayquant/tiny-llama" and plan.num_workers == 2
    assert not (tmp_path / "cache" / "models").exists()


def test_an_unknown_tiny_id_is_bad_input():
    assert "tiny models are rayquant/tiny-llama" in model_problems("rayquant/tiny-gpt9")[0]
    assert model_problems(None) == ["{model} is required: a hub id, a local directory or rayquant/tiny-llama"]
    with pytest.raises(UnknownModelError, match="tiny models are"):
        config_path("rayquant/tiny-gpt9")


def test_node_types_offline_live_or_this_machine(monkeypatch, tmp_path):
    inv = tmp_path / "nodes.yaml"
    inv.write_text("- {gpu: L4, count: 2}\n")
    both = planning.node_types(gpus="1x8xH100-80GB", inventory=str(inv))
    assert [nt.key for nt in both] == ["H100-80GB:8", "L4:1"]
    from rayquant import inventory

    seen = []
    monkeypatch.setattr(inventory, "discover_node_types", lambda address: seen.append(address) or both)
    assert planning.node_types(address="head:6379") == both and seen == ["head:6379"]
    cpu = NodeType(gpu=cpu_device(8 * 2**30), gpus_per_node=16, count=1, host_memory_bytes=8 * 2**30,
                   cpus_per_node=16)
    monkeypatch.setattr(inventory, "local_node_types", lambda: (cpu,))
    # A CPU-only machine offers the workers the run asks for (default 2), not one per CPU.
    assert [nt.gpus_per_node for nt in planning.node_types(cpu_workers=3)] == [3]
    assert [nt.gpus_per_node for nt in planning.node_types()] == [planning.DEFAULT_CPU_WORKERS]
