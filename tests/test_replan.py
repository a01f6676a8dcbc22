"""planner.replan: the out-of-memory ladder keeps every worker's share of the global batch, respects
pins, ends in an error with the figures, and restart records name only what changed."""

from __future__ import annotations

import dataclasses

import pytest

import planner
from planner.hardware import GIB
from planner.replan import (NothingCheaperError, changed_settings, cheaper, describe_changes,
                            replan_out_of_memory)

MODEL = "meta-llama/Llama-3.2-1B"


@pytest.fixture(scope="module")
def spec():
    return planner.load_model_spec(MODEL)


@pytest.fixture(scope="module")
def plan(spec):
    # Two node types, each worker 4 x 2 = 8 of the 24 sequences, 16-bit weights, fp32 AdamW.
    return planner.make_plan(spec, planner.parse_gpu_spec("1x2xA10G,1x1xA10G"),
                             planner.JobSpec(seq_len=2048, global_batch_size=24))


def test_the_plan_under_test_starts_at_the_top_of_the_ladder(plan):
    p = plan.node_plan("A10G:2")
    assert (p.micro_batch_size, p.gradient_accumulation_steps) == (4, 2)
    assert (p.gradient_checkpointing, p.optimizer, p.quantization) == ("none", "adamw_torch", "bf16")


def test_the_ladder_walks_micro_batch_then_checkpointing_optimizer_and_4bit(plan, spec):
    steps, current = [], plan
    while True:
        try:
            r = replan_out_of_memory(current, "A10G:2", model=spec, step=12)
        except NothingCheaperError:
            break
        steps.append(r.summary)
        # Each rank's share and the global batch stay; the other node type is untouched.
        assert r.plan.node_plan("A10G:2").samples_per_step == 8
        assert r.plan.global_batch_size == plan.global_batch_size == 24
        assert r.plan.node_plan("A10G:1") == plan.node_plan("A10G:1")
        current = r.plan
    assert steps == ["micro-batch 4 -> 2, accumulation 2 -> 4", "micro-batch 2 -> 1, accumulation 4 -> 8",
                     "checkpointing none -> hf", "checkpointing hf -> unsloth",
                     "optimizer adamw_torch -> adamw_8bit", "optimizer adamw_8bit -> paged_adamw_8bit",
                     "quantization bf16 -> nf4"]


def test_a_cheaper_rung_predicts_less_memory_and_says_why(plan, spec):
    r = replan_out_of_memory(plan, "A10G:2", model=spec, step=12, seen_bytes=23 * GIB)
    old, new = plan.node_plan("A10G:2"), r.plan.node_plan("A10G:2")
    assert new.peak_memory_bytes < old.peak_memory_bytes
    assert "out of memory at step 12 (23.00 GiB seen)" in new.reasons["micro_batch_size"]
    assert r.before == {"micro_batch_size": 4, "gradient_accumulation_steps": 2}
    assert r.after == {"micro_batch_size": 2, "gradient_accumulation_steps": 4}


def test_micro_batch_steps_go_through_divisors_of_the_share(spec):
    plan = planner.make_plan(spec, planner.parse_gpu_spec("1x1xH100-80GB"),
                             planner.JobSpec(seq_len=512, global_batch_size=6))
    p = plan.node_plans[0]
    assert p.samples_per_step == 6
    assert cheaper(dataclasses.replace(p, micro_batch_size=6, gradient_accumulation_steps=1), plan.job) == {
        "micro_batch_size": 3, "gradient_accumulation_steps": 2}


def test_pinned_settings_are_never_changed(plan):
    job = dataclasses.replace(plan.job, micro_batch_size=4, optimizer="adamw_torch")
    p = plan.node_plan("A10G:2")
    assert cheaper(p, job) == {"gradient_checkpointing": "hf"}
    spent = dataclasses.replace(p, gradient_checkpointing="unsloth")
    assert cheaper(spent, job) == {"quantization": "nf4"}
    assert cheaper(dataclasses.replace(spent, quantization="dynamic-4bit"), job) == {"quantization": "nf4"}
    assert cheaper(dataclasses.replace(spent, quantization="nf4"), job) is None


def test_zero3_and_full_finetuning_keep_16bit_weights(plan):
    p = dataclasses.replace(plan.node_plan("A10G:2"), micro_batch_size=1, gradient_accumulation_steps=8,
                            gradient_checkpointing="unsloth", optimizer="paged_adamw_8bit")
    assert cheaper(p, plan.job) == {"quantization": "nf4"}
    assert cheaper(dataclasses.replace(p, placement="zero3"), plan.job) is None
    assert cheaper(p, dataclasses.replace(plan.job, full_finetune=True)) is None


def test_nothing_cheaper_says_the_memory_seen_and_what_would_fit(plan, spec):
    p = dataclasses.replace(plan.node_plan("A10G:2"), micro_batch_size=1, gradient_accumulation_steps=8,
                            gradient_checkpointing="unsloth", optimizer="paged_adamw_8bit",
                            quantization="nf4")
    spent = dataclasses.replace(plan, node_plans=(p, plan.node_plan("A10G:1")))
    with pytest.raises(NothingCheaperError) as e:
        replan_out_of_memory(spent, "A10G:2", model=spec, step=7, seen_bytes=int(21.5 * GIB),
                             capacity_bytes=int(22 * GIB))
    text = str(e.value)
    assert "A10G:2 ran out of memory at step 7" in text
    assert "21.50 GiB in use of 22.00 GiB" in text
    assert "To fix: lower seq_len from 2048 to at most " in text
    fits = int(text.split("to at most ")[1].split(" ")[0])
    assert 0 < fits < 2048
    # The suggested length fits the budget once the prediction is scaled up to what ran out.
    est = planner.estimate_memory(spec, planner.lookup_gpu("A10G"), quantization="nf4", seq_len=fits,
                                  micro_batch_size=1, gradient_checkpointing="unsloth",
                                  optimizer="paged_adamw_8bit")
    at_2048 = planner.estimate_memory(spec, planner.lookup_gpu("A10G"), quantization="nf4", seq_len=2048,
                                      micro_batch_size=1, gradient_checkpointing="unsloth",
                                      optimizer="paged_adamw_8bit")
    assert est.peak_bytes * (22 * GIB / at_2048.peak_bytes) <= p.memory_budget_bytes
    # Placeholders render per face: the trainer's spelling of seq_len.
    assert "{seq_len}" in e.value.template


def test_changed_settings_for_a_lost_node(plan):
    lost = dataclasses.replace(plan, node_plans=(dataclasses.replace(plan.node_plan("A10G:1"),
                                                                     gradient_accumulation_steps=6),),
                               workers=(dataclasses.replace(plan.workers[-1], rank=0),))
    before, after = changed_settings(plan, lost, "A10G:2")
    assert before["nodes"] == 1 and after["nodes"] == 0
    assert (before["num_workers"], after["num_workers"]) == (3, 1)
    assert before["node_types"] == {"A10G:1": {"gradient_accumulation_steps": 2}}
    assert after["node_types"] == {"A10G:1": {"gradient_accumulation_steps": 6}}
    line = describe_changes(before, after)
    assert line.startswith("workers 3 -> 1, nodes 1 -> 0")
    assert "on A10G:1: accumulation 2 -> 6" in line
