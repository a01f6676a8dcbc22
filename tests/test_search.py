"""planner.search.make_plan: choices, errors, and properties over random inventories (hypothesis)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.hardware import GPU_CATALOG, NodeType, lookup_gpu, parse_gpu_spec
from planner.model import load_model_spec
from planner.plan import JobSpec, PlanError, TrainingPlan
from planner.search import make_plan
from planner.vocab import render_settings

LLAMA_8B = load_model_spec("meta-llama/Llama-3.1-8B")
GPUS = [g for g in GPU_CATALOG if g.name in ("T4", "A10G", "L4", "RTX-4090", "A100-40GB", "A100-80GB",
                                              "H100-80GB", "L40S")]


def _flag(setting: str) -> str:
    """A CLI-like spelling of a setting's neutral name."""
    return "--" + setting.replace("_", "-")


def test_choices_follow_compute_capability():
    plan = make_plan(LLAMA_8B, parse_gpu_spec("1x8xH100-80GB,1x1xL4,1x1xT4,1x1xA100-80GB"),
                     JobSpec(seq_len=2048, global_batch_size=32))
    by = {p.gpu: p for p in plan.node_plans}
    # FP8 is tried on Hopper and priced by the model: at 8B its casts cost what its GEMMs save.
    assert by["H100-80GB"].quantization == "bf16" and "fp8 (" in by["H100-80GB"].reasons["quantization"]
    assert by["L4"].quantization == "dynamic-4bit"
    assert by["T4"].compute_dtype == "float16"
    assert by["A100-80GB"].quantization == "bf16"
    assert by["L4"].protected_budget_bytes > 0
    for p in plan.node_plans:
        assert set(p.reasons) >= {"quantization", "micro_batch_size", "gradient_accumulation_steps",
                                  "optimizer", "gradient_checkpointing", "placement"}
    accurate = make_plan(LLAMA_8B, parse_gpu_spec("8xH100-80GB"), JobSpec(prefer="accuracy"))
    assert accurate.node_plans[0].quantization == "bf16"


def _options(plan_job: JobSpec, gpu: str) -> dict:
    """Each allowed quantization's best candidate on one `gpu` (None where nothing fits)."""
    from planner.memory import budget_bytes
    from planner.search.assemble import UNCALIBRATED
    from planner.search.candidates import best_candidate
    from planner.search.policy import allowed_quantizations, micro_batches

    nt = parse_gpu_spec(gpu)[0]
    quants, _ = allowed_quantizations(LLAMA_8B, nt.gpu, plan_job)
    budget = budget_bytes(nt.gpu.memory_bytes, plan_job.safety_margin)
    return {q: best_candidate(LLAMA_8B, nt, plan_job, budget, (q,), "per-gpu", micro_batches(plan_job),
                              UNCALIBRATED) for q in quants}


@pytest.mark.parametrize("seq_len", [512, 2048, 8192])
def test_l4_choices_are_consistent_with_predictions(seq_len):
    """Ada (cc 8.9): every preference tries the same quantizations, FP8 (row-wise) among them;
    balanced and speed take the fastest predicted, accuracy the most precise that fits, and each
    reason names the other options with their predicted tokens/s or why they do not fit."""
    plans = {p: make_plan(LLAMA_8B, parse_gpu_spec("L4"),
                          JobSpec(seq_len=seq_len, global_batch_size=16, prefer=p)).node_plans[0]
             for p in ("balanced", "speed", "accuracy")}
    options = _options(JobSpec(seq_len=seq_len, global_batch_size=16), "L4")
    assert set(options) == {"bf16", "fp8", "dynamic-4bit"}
    fitting = {q: c for q, c in options.items() if c is not None}
    fastest = max(fitting, key=lambda q: fitting[q].tokens_per_s)
    assert plans["balanced"].quantization == plans["speed"].quantization == fastest
    assert plans["accuracy"].quantization == next(q for q in ("bf16", "fp8", "dynamic-4bit") if q in fitting)
    for p in plans.values():
        reason = p.reasons["quantization"]
        for q in options:
            if q == p.quantization:
                continue
            assert (f"{q} (does not fit" in reason if options[q] is None else
                    f"{q} ({options[q].tokens_per_s:,.0f} tok/s)" in reason), (q, reason)
        if p.quantization == "fp8":
            assert p.fp8_path == "rowwise" and "row-wise" in reason


def test_fp8_on_ada_needs_its_16bit_load_to_fit():
    """The row-wise path loads 16-bit weights first: a 70B model on an L40S does not get FP8."""
    from planner.search.policy import allowed_quantizations

    l40s = lookup_gpu("L40S")
    big = load_model_spec("meta-llama/Llama-3.3-70B-Instruct")
    quants, notes = allowed_quantizations(big, l40s, JobSpec())
    assert "fp8" not in quants and "loads the 16-bit weights first" in notes["fp8"]
    quants, _ = allowed_quantizations(LLAMA_8B, l40s, JobSpec())
    assert "fp8" in quants


def test_workers_in_rank_order_and_json_round_trip():
    plan = make_plan(LLAMA_8B, parse_gpu_spec("2x2xA100-80GB,3x1xA10G"), JobSpec(global_batch_size=14))
    assert [(w.node_type, w.node_index, w.local_rank) for w in plan.workers] == [
        ("A100-80GB:2", 0, 0), ("A100-80GB:2", 0, 1), ("A100-80GB:2", 1, 0), ("A100-80GB:2", 1, 1),
        ("A10G:1", 0, 0), ("A10G:1", 1, 0), ("A10G:1", 2, 0)]
    assert TrainingPlan.from_json(plan.to_json()) == plan
    assert plan.model_summary["num_params"] == LLAMA_8B.num_params


def test_pins_are_honoured_or_refused():
    plan = make_plan(LLAMA_8B, parse_gpu_spec("2xA100-80GB"),
                     JobSpec(quantization="nf4", optimizer="paged_adamw_8bit", micro_batch_size=2,
                             gradient_checkpointing="unsloth", global_batch_size=8))
    p = plan.node_plans[0]
    assert (p.quantization, p.optimizer, p.micro_batch_size, p.gradient_checkpointing) == \
        ("nf4", "paged_adamw_8bit", 2, "unsloth")
    with pytest.raises(PlanError, match="FP8"):
        make_plan(LLAMA_8B, parse_gpu_spec("A100-80GB"), JobSpec(quantization="fp8"))
    with pytest.raises(PlanError, match="To fix"):
        make_plan(LLAMA_8B, parse_gpu_spec("T4"), JobSpec(quantization="bf16", micro_batch_size=8))


def test_nothing_fits_says_what_is_missing_per_node_type():
    with pytest.raises(PlanError) as e:
        make_plan("meta-llama/Llama-3.1-70B", parse_gpu_spec("1xT4,1xA10G"), JobSpec(seq_len=4096))
    msg = str(e.value)
    assert "T4:1" in msg and "A10G:1" in msg and "GiB more" in msg and "a GPU with at least" in msg
    # Settings are named neutrally; each face renders its own spelling (the CLI's flags here).
    assert "at seq_len 4096" in msg and "(lora_targets q_proj,v_proj)" in msg and "--" not in msg
    flags = e.value.render(_flag)
    assert "at --seq-len 4096" in flags and "(--lora-targets q_proj,v_proj)" in flags


def test_errors_name_settings_for_every_face():
    with pytest.raises(PlanError) as e:
        make_plan(LLAMA_8B, (), JobSpec())
    assert str(e.value).startswith("the inventory is empty. To fix: pass gpus like")
    assert "pass --gpus like" in e.value.render(_flag)
    with pytest.raises(PlanError) as e:
        make_plan(LLAMA_8B, parse_gpu_spec("A100-80GB"), JobSpec(quantization="nf4", full_finetune=True))
    assert "quantization nf4 is pinned with full_finetune" in str(e.value)
    assert "--quantization nf4 is pinned with --full-finetune" in e.value.render(_flag)


def test_larger_models_span_a_node_or_shard():
    plan = make_plan("meta-llama/Llama-3.1-70B", parse_gpu_spec("1x4xL4"), JobSpec(seq_len=1024))
    p = plan.node_plans[0]
    assert p.placement == "node-spanning" and p.workers_per_node == 1 and p.gpus_per_worker == 4
    assert p.device_map["model.embed_tokens"] == 0 and p.device_map["lm_head"] == 3
    assert p.peak_memory_bytes <= p.memory_budget_bytes
    full = make_plan(LLAMA_8B, parse_gpu_spec("8x1xA10G"), JobSpec(full_finetune=True, seq_len=1024))
    assert full.node_plans[0].placement == "zero3" and full.node_plans[0].backend == "hf"


LLAMA_70B = "meta-llama/Llama-3.3-70B-Instruct"


def test_a_70b_model_trains_as_qlora_with_zero3_on_four_small_gpus():
    # 4 nodes x 1 A10G (96 GB in all): no GPU holds the 4-bit model, bf16 does not fit even sharded,
    # so 4-bit weights packed into bf16 storage are sharded over the 4 GPUs.
    plan = make_plan(LLAMA_70B, parse_gpu_spec("4x1xA10G"), JobSpec(seq_len=1024))
    p = plan.node_plans[0]
    assert (p.placement, p.backend, p.nodes, p.workers_per_node) == ("zero3", "hf", 4, 1)
    assert p.quantization in ("nf4", "dynamic-4bit") and p.compute_dtype == "bfloat16"
    assert p.peak_memory_bytes <= p.memory_budget_bytes
    # Why: bf16 misses the budget even sharded, said with its bytes.
    assert "QLoRA + ZeRO-3" in p.reasons["quantization"] and "over bf16 (does not fit: " in p.reasons[
        "quantization"]
    assert "ZeRO-3 over 4 GPUs" in p.reasons["placement"] and "1/4" in p.reasons["placement"]
    assert "loads whole into host RAM first" in p.reasons["placement"] and p.host_memory_bytes > 30 * 2**30
    assert len(plan.workers) == 4
    # The rayquant face accepts it as one ZeRO-3 group.
    from rayquant.zero import bnb_config_kwargs, zero3_problems

    assert zero3_problems(plan) == []
    assert bnb_config_kwargs(p)["bnb_4bit_quant_storage"] == "bfloat16"


def test_zero3_shortfall_is_the_sharded_one_with_its_fixes():
    # At 4096 tokens the 4-bit ZeRO-3 configuration misses: the error says so, per GPU with the
    # sharding, and gives the sequence length that fits (which then plans).
    with pytest.raises(PlanError) as e:
        make_plan(LLAMA_70B, parse_gpu_spec("4x1xA10G"), JobSpec(seq_len=4096))
    msg = str(e.value)
    assert "ZeRO-3 over 4 GPUs" in msg and "dynamic-4bit" in msg
    fits = int(msg.split("(seq_len ")[1].split(" fits")[0])
    assert 2048 <= fits < 4096
    assert make_plan(LLAMA_70B, parse_gpu_spec("4x1xA10G"), JobSpec(seq_len=fits)).node_plans[0].placement == "zero3"
    # One GPU of the same kind has nothing to shard over: the unsharded shortfall, no ZeRO-3.
    with pytest.raises(PlanError) as e:
        make_plan(LLAMA_70B, parse_gpu_spec("1x1xA10G"), JobSpec(seq_len=1024))
    assert "ZeRO-3" not in str(e.value)


def test_zero3_never_shards_fp8_and_keeps_pins():
    from planner.search.policy import placement_quantizations

    assert placement_quantizations(("bf16", "fp8", "dynamic-4bit"), "zero3") == ("bf16", "dynamic-4bit")
    assert placement_quantizations(("fp8",), "zero3") == ()
    assert placement_quantizations(("bf16", "fp8"), "per-gpu") == ("bf16", "fp8")
    # Pinned NF4 is planned as pinned under ZeRO-3, and said to be pinned.
    p = make_plan(LLAMA_70B, parse_gpu_spec("4x1xA10G"), JobSpec(seq_len=1024, quantization="nf4")).node_plans[0]
    assert (p.placement, p.quantization) == ("zero3", "nf4") and p.reasons["quantization"] == "pinned to nf4"
    # Pinned FP8 (H100 has the path) has no ZeRO-3 candidate: refused with that fix, not silently
    # re-quantized; pinned bf16 shards.
    # (At 4096 tokens FP8 70B no longer fits one H100 per worker.)
    four_h100 = parse_gpu_spec("4x1xH100-80GB")
    with pytest.raises(PlanError) as e:
        make_plan(LLAMA_70B, four_h100, JobSpec(seq_len=4096, quantization="fp8"))
    assert "ZeRO-3 over the 4 GPUs, which shards quantization bf16 or nf4 but not fp8" in str(e.value)
    p = make_plan(LLAMA_70B, four_h100, JobSpec(seq_len=4096, quantization="bf16")).node_plans[0]
    assert (p.placement, p.quantization) == ("zero3", "bf16")


def test_partial_fit_leaves_node_types_out_with_a_warning():
    plan = make_plan("meta-llama/Llama-3.1-70B", parse_gpu_spec("1x8xH100-80GB,2x1xT4"), JobSpec())
    assert [p.gpu for p in plan.node_plans] == ["H100-80GB"]
    assert any("T4" in w for w in plan.warnings)


def test_global_batch_warning_when_workers_outnumber_it():
    plan = make_plan(LLAMA_8B, parse_gpu_spec("1x8xA100-80GB"), JobSpec(global_batch_size=5))
    assert plan.global_batch_size == 8 and plan.warnings


def test_thousand_node_inventory_is_grouped():
    inventory = parse_gpu_spec("300x8xH100-80GB,400x1xA10G,200x4xL4,100x2xT4")
    plan = make_plan(LLAMA_8B, inventory, JobSpec(global_batch_size=9000))
    assert sum(p.nodes for p in plan.node_plans) == 1000
    assert plan.num_workers == 300 * 8 + 400 + 200 * 4 + 100 * 2
    assert plan.global_batch_size == 9000
    # One sequence per step already makes the T4/L4/A10G workers pace the H100s: the plan says so.
    assert len(plan.warnings) == 1 and "pace every step" in plan.warnings[0]
    assert "A10G:1, L4:4, T4:2" in plan.warnings[0]
    # Warnings keep the placeholders; faces render them.
    assert "leave them out of {gpus}, or raise {global_batch_size} toward" in plan.warnings[0]
    assert "raise --global-batch-size toward" in render_settings(plan.warnings[0], _flag)
    # Worker counts 2400/400/800/200 only make multiples of 200: the nearest larger is 8200, but it
    # needs 4 sequences per A10G (3 per H100 would overshoot); 8600 keeps every slow worker at one.
    odd = make_plan(LLAMA_8B, inventory, JobSpec(global_batch_size=8192))
    assert "nearest larger batch is 8200" in odd.warnings[0]
    assert odd.global_batch_size == 8600 and "the plan uses 8600" in odd.warnings[1]
    assert [p.samples_per_step for p in odd.node_plans] == [3, 1, 1, 1]


def test_shares_follow_speed_rather_than_an_exact_but_slow_split():
    # 16 H100 + 4 T4 workers and 64 sequences split exactly only as 3 per H100 and 4 per T4,
    # which makes the slow workers take the most; 4 + 1 (68 sequences) is 4x faster per step.
    plan = make_plan(LLAMA_8B, parse_gpu_spec("2x8xH100-80GB,4x1xT4"), JobSpec(global_batch_size=64))
    h100, a10g = plan.node_plans
    assert a10g.samples_per_step < h100.samples_per_step
    assert plan.global_batch_size == 68 and "speed's share" in plan.warnings[0]
    assert any("without T4:1" in w for w in plan.warnings)
    # A batch that splits well in proportion to speed is kept as asked, with no warning.
    big = make_plan(LLAMA_8B, parse_gpu_spec("2x8xH100-80GB,4x1xT4"), JobSpec(global_batch_size=516))
    assert big.global_batch_size == 516 and not big.warnings


def test_shares_are_counts_a_worker_runs_at_the_speed_they_were_split_by():
    # 512 sequences on 16 H100 + 4 A10G split exactly as 31 per H100 + 4 per A10G, but 31 samples
    # run only as one micro-batch of 31 (recomputing) or 31 of one: far below the speed the split
    # assumed. Shares are counts whose micro-batches the worker runs at its predicted speed.
    from planner.search.assemble import UNCALIBRATED, _node_plan
    from planner.search.batching import worker_rate
    from planner.search.candidates import search_type

    job = JobSpec(global_batch_size=512)
    plan = make_plan(LLAMA_8B, parse_gpu_spec("2x8xH100-80GB,4x1xA10G"), job)
    types = [search_type(LLAMA_8B, nt, job, UNCALIBRATED) for nt in parse_gpu_spec("2x8xH100-80GB,4x1xA10G")]

    def step_s(node_plans):
        return max(p.samples_per_step * job.seq_len / p.tokens_per_second for p in node_plans)

    exact = [_node_plan(LLAMA_8B, t, job, n, UNCALIBRATED) for t, n in zip(types, (31, 4))]
    assert exact[0].micro_batch_size in (1, 31)  # what an exact but prime share leaves
    for p, t in zip(plan.node_plans, types):  # each share runs at the speed it was split by
        assert p.tokens_per_second == pytest.approx(worker_rate(t, p.samples_per_step, job))
    assert step_s(exact) > 1.25 * step_s(plan.node_plans)
    assert plan.global_batch_size > 512 and any("the plan uses" in w for w in plan.warnings)


# -- properties ----------------------------------------------------------------------------------
node_type = st.builds(lambda g, per, n: NodeType(gpu=g, gpus_per_node=per, count=n),
                      st.sampled_from(GPUS), st.sampled_from([1, 2, 4, 8]), st.integers(1, 6))
jobs = st.builds(JobSpec, seq_len=st.sampled_from([512, 1024, 2048, 4096]),
                 global_batch_size=st.integers(1, 256), lora_rank=st.sampled_from([8, 16, 64]),
                 prefer=st.sampled_from(["accuracy", "balanced", "speed"]))
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.lists(node_type, min_size=1, max_size=3, unique_by=lambda n: (n.gpu.name, n.gpus_per_node)), jobs)
def test_every_plan_fits_with_its_margin_and_meets_the_batch(types, job):
    try:
        plan = make_plan(LLAMA_8B, types, job)
    except PlanError:
        return  # nothing fits: covered by the error tests
    for p in plan.node_plans:
        assert p.peak_memory_bytes <= p.memory_budget_bytes
        gpu = lookup_gpu(p.gpu)
        assert p.memory_budget_bytes <= gpu.memory_bytes * (1 - job.safety_margin) + 1
        assert p.breakdown.total <= p.peak_memory_bytes + 1 or p.placement == "node-spanning"
    assert plan.global_batch_size >= job.global_batch_size
    if plan.global_batch_size != job.global_batch_size:
        assert plan.warnings
    if job.global_batch_size % plan.num_workers == 0:
        # An exact split exists; only a much faster step (distribute's rule) may replace it.
        assert plan.global_batch_size == job.global_batch_size or any(
            "speed's share" in w for w in plan.warnings)


@SETTINGS
@given(st.sampled_from(GPUS), st.floats(1.0, 3.0), st.sampled_from([1, 2, 4]), jobs,
       st.sampled_from(["balanced", "speed"]))
def test_more_memory_never_gives_a_slower_plan(gpu, factor, per_node, job, prefer):
    from planner.search.policy import BALANCED_SPEEDUP

    job = dataclasses.replace(job, prefer=prefer)
    bigger = dataclasses.replace(gpu, memory_bytes=int(gpu.memory_bytes * factor))
    try:
        small = make_plan(LLAMA_8B, [NodeType(gpu=gpu, gpus_per_node=per_node, count=1)], job)
    except PlanError:
        return
    large = make_plan(LLAMA_8B, [NodeType(gpu=bigger, gpus_per_node=per_node, count=1)], job)
    # balanced may spend up to BALANCED_SPEEDUP of speed on more precise weights that now fit.
    slack = BALANCED_SPEEDUP if prefer == "balanced" else 1.0
    assert large.tokens_per_second * slack >= small.tokens_per_second * (1 - 1e-9)


def test_balanced_keeps_precision_unless_the_speed_up_is_clear():
    job = JobSpec(global_batch_size=512)
    h100 = parse_gpu_spec("2x8xH100-80GB")
    balanced = make_plan(LLAMA_8B, h100, job).node_plans[0]
    speed = make_plan(LLAMA_8B, h100, dataclasses.replace(job, prefer="speed")).node_plans[0]
    assert balanced.quantization == "bf16"
    assert speed.tokens_per_second > balanced.tokens_per_second  # a less precise option is faster...
    assert speed.tokens_per_second < 1.10 * balanced.tokens_per_second  # ...by less than 10%
    assert "within 10% of the fastest predicted, balanced keeps the more precise" in balanced.reasons["quantization"]
    # Where 4-bit is much faster (an A10G: bf16 barely fits), balanced takes it as speed does.
    a10g, job = parse_gpu_spec("1x1xA10G"), JobSpec(global_batch_size=64)
    assert (make_plan(LLAMA_8B, a10g, job).node_plans[0].quantization
            == make_plan(LLAMA_8B, a10g, dataclasses.replace(job, prefer="speed")).node_plans[0].quantization
            == "dynamic-4bit")
