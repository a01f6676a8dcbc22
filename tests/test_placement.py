"""Per-worker placement: label selectors in rank order, and the cluster-can-host check (no Ray here)."""

from __future__ import annotations

import pytest

from planner.hardware import GpuSpec, NodeType
from planner.plan import JobSpec, MemoryBreakdown, NodePlan, PlanError, TrainingPlan, WorkerAssignment
from rayquant.placement import (
    NODE_ID_LABEL,
    NODE_TYPE_LABEL,
    PlacementError,
    check_cluster_can_host,
    node_type_label_value,
    rank_order_problems,
    resources_per_worker,
    scaling_config_kwargs,
    selector_matches,
    worker_label_selectors,
    worker_placement_problem,
)

GIB = 1024**3
H100 = GpuSpec("H100-80GB", ("NVIDIA H100 80GB HBM3",), 80 * GIB, (9, 0), 989.0, 989.0, 1979.0, 3350.0, "test")
A10G = GpuSpec("A10G", ("NVIDIA A10G",), 24 * GIB, (8, 6), 70.0, 70.0, None, 600.0, "test")


def node_plan(key, gpu, nodes, workers_per_node, gpus_per_worker=1, micro=1, accum=1):
    return NodePlan(
        node_type=key, gpu=gpu, nodes=nodes, gpus_per_node=workers_per_node * gpus_per_worker,
        quantization="nf4", compute_dtype="bfloat16", micro_batch_size=micro,
        gradient_accumulation_steps=accum, optimizer="adamw_8bit", gradient_checkpointing="unsloth",
        placement="per-gpu" if gpus_per_worker == 1 else "node-spanning", backend="unsloth",
        workers_per_node=workers_per_node, gpus_per_worker=gpus_per_worker, peak_memory_bytes=GIB,
        memory_budget_bytes=2 * GIB, breakdown=MemoryBreakdown(GIB, 0, 0, 0, 0, 0, 0),
        tokens_per_second=100.0, reasons={})


def plan_of(*node_plans, order=None):
    workers = []
    for p in node_plans:
        for n in range(p.nodes):
            for local in range(p.workers_per_node):
                workers.append((p.node_type, n, local))
    if order is not None:
        workers = [workers[i] for i in order]
    return TrainingPlan(model="tiny", model_summary={}, job=JobSpec(), node_plans=node_plans,
                        workers=tuple(WorkerAssignment(r, t, n, l) for r, (t, n, l) in enumerate(workers)))


MIXED = plan_of(node_plan("H100-80GB:8", "H100-80GB", 2, 8, micro=4),
                node_plan("A10G:1", "A10G", 4, 1, micro=1, accum=2))


def cluster(h100_nodes=2, a10g_nodes=4):
    return (NodeType(H100, 8, h100_nodes, node_ids=tuple(f"h{i}" for i in range(h100_nodes))),
            NodeType(A10G, 1, a10g_nodes, node_ids=tuple(f"a{i}" for i in range(a10g_nodes))))


def test_label_value_is_a_valid_ray_label_value():
    from ray._private.label_utils import validate_label_value

    for key in ("H100-80GB:8", "RTX-4090:1", "CPU:1", "generic 24GiB:2"):
        value = node_type_label_value(key)
        validate_label_value(value)  # raises on an invalid value
        assert ":" not in value and " " not in value
    assert node_type_label_value("H100-80GB:8") == "H100-80GB-8"


def test_selectors_pin_each_rank_to_its_planned_node_by_node_id():
    selectors = worker_label_selectors(MIXED, cluster(), node_labels={})
    assert len(selectors) == MIXED.num_workers == 20
    for w, sel in zip(MIXED.workers, selectors):
        prefix = "h" if w.node_type.startswith("H100") else "a"
        assert sel == {NODE_ID_LABEL: f"{prefix}{w.node_index}"}


def test_selectors_use_the_node_type_label_when_every_node_of_the_type_has_it():
    labels = {f"h{i}": {NODE_TYPE_LABEL: "H100-80GB-8"} for i in range(2)}
    labels.update({"a0": {NODE_TYPE_LABEL: "A10G-1"}})  # a1..a3 lack the label
    selectors = worker_label_selectors(MIXED, cluster(), node_labels=labels)
    by_type = {}
    for w, sel in zip(MIXED.workers, selectors):
        by_type.setdefault(w.node_type, []).append(sel)
    assert all(s == {NODE_TYPE_LABEL: "H100-80GB-8"} for s in by_type["H100-80GB:8"])
    assert [s[NODE_ID_LABEL] for s in by_type["A10G:1"]] == ["a0", "a1", "a2", "a3"]


def test_offline_inventory_without_node_ids_falls_back_to_the_type_label():
    offline = (NodeType(H100, 8, 2), NodeType(A10G, 1, 4))
    selectors = worker_label_selectors(MIXED, offline, node_labels={})
    assert {tuple(s.items()) for s in selectors} == {((NODE_TYPE_LABEL, "H100-80GB-8"),),
                                                     ((NODE_TYPE_LABEL, "A10G-1"),)}


def test_selectors_are_accepted_by_ray_scaling_config():
    from ray.train import ScalingConfig

    kwargs = scaling_config_kwargs(MIXED, cluster(), node_labels={})
    config = ScalingConfig(**kwargs)
    assert config._label_selector_per_worker(MIXED.num_workers) == kwargs["label_selector"]
    assert kwargs["resources_per_worker"] == {"CPU": 1.0, "GPU": 1.0}
    assert kwargs["use_gpu"] is True


def test_missing_node_names_what_is_missing_and_how_to_fix():
    with pytest.raises(PlacementError) as err:
        check_cluster_can_host(MIXED, cluster(h100_nodes=1))
    msg = str(err.value)
    assert "plan needs 2 nodes of H100-80GB:8, cluster has 1" in msg
    assert "rayquant plan" in msg and "add nodes" in msg
    assert isinstance(err.value, PlanError)


def test_every_problem_is_reported_at_once():
    with pytest.raises(PlacementError) as err:
        check_cluster_can_host(MIXED, (NodeType(H100, 8, 1),))
    msg = str(err.value)
    assert "H100-80GB:8, cluster has 1" in msg and "A10G:1, cluster has 0" in msg


def test_a_cluster_with_enough_nodes_passes():
    check_cluster_can_host(MIXED, cluster())
    check_cluster_can_host(MIXED, cluster(h100_nodes=3, a10g_nodes=5))


def test_too_few_cpus_for_the_workers_of_a_node_is_reported():
    types = (NodeType(H100, 8, 2, cpus_per_node=4), NodeType(A10G, 1, 4))
    with pytest.raises(PlacementError, match="8 workers need 8 CPUs, its nodes have 4"):
        check_cluster_can_host(MIXED, types)


def test_interleaved_ranks_are_refused_because_ray_train_numbers_ranks_by_node():
    two = plan_of(node_plan("H100-80GB:8", "H100-80GB", 1, 2), node_plan("A10G:1", "A10G", 1, 1))
    assert rank_order_problems(two) == []
    interleaved = plan_of(node_plan("H100-80GB:8", "H100-80GB", 1, 2), node_plan("A10G:1", "A10G", 1, 1),
                          order=[0, 2, 1])
    problems = rank_order_problems(interleaved)
    assert len(problems) == 1 and "worker 2" in problems[0]
    with pytest.raises(PlacementError, match="Ray Train numbers ranks node by node"):
        check_cluster_can_host(interleaved, (NodeType(H100, 8, 1), NodeType(A10G, 1, 1)))


def test_node_types_needing_different_gpus_per_worker_are_refused():
    spanning = plan_of(node_plan("H100-80GB:8", "H100-80GB", 1, 8), node_plan("A10G:4", "A10G", 1, 1, 4))
    with pytest.raises(PlacementError, match="different GPU counts"):
        resources_per_worker(spanning)
    all_spanning = plan_of(node_plan("A10G:4", "A10G", 2, 1, 4))
    assert resources_per_worker(all_spanning) == {"CPU": 1.0, "GPU": 4.0}


def test_cpu_plans_reserve_no_gpu():
    cpu = plan_of(node_plan("CPU:2", "CPU", 1, 2))
    assert resources_per_worker(cpu) == {"CPU": 1.0}


@pytest.mark.parametrize("selector,labels,expected", [
    ({"a": "x"}, {"a": "x"}, True),
    ({"a": "x"}, {"a": "y"}, False),
    ({"a": "x"}, {}, False),
    ({"a": "!x"}, {"a": "y"}, True),
    ({"a": "in(x, y)"}, {"a": "y"}, True),
    ({"a": "!in(x,y)"}, {"a": "y"}, False),
    ({"a": "x", "b": "z"}, {"a": "x", "b": "z"}, True),
])
def test_selector_matching_follows_ray_label_selector_syntax(selector, labels, expected):
    assert selector_matches(selector, labels) is expected


def test_a_worker_on_its_planned_node_may_train():
    selectors = worker_label_selectors(MIXED, cluster(), node_labels={})
    assert worker_placement_problem(selectors, 0, {NODE_ID_LABEL: "h0"}) is None
    assert worker_placement_problem(selectors, 19, {NODE_ID_LABEL: "a3", "other": "x"}) is None
    by_type = [{NODE_TYPE_LABEL: "A10G-1"}]
    assert worker_placement_problem(by_type, 0, {NODE_ID_LABEL: "n", NODE_TYPE_LABEL: "A10G-1"}) is None


def test_a_worker_on_the_wrong_node_gets_a_clear_error():
    selectors = worker_label_selectors(MIXED, cluster(), node_labels={})
    problem = worker_placement_problem(selectors, 16, {NODE_ID_LABEL: "h1"})  # rank 16 belongs on a0
    assert problem is not None
    assert "rank 16 runs on node h1" in problem and "{'ray.io/node-id': 'a0'}" in problem
    assert "To fix: re-plan with `rayquant plan`" in problem
    wrong_type = worker_placement_problem([{NODE_TYPE_LABEL: "A10G-1"}], 0,
                                          {NODE_ID_LABEL: "n", NODE_TYPE_LABEL: "H100-80GB-8"})
    assert wrong_type is not None and "rayquant.io/node-type" in wrong_type
    assert "rank 3 has no placement" in worker_placement_problem(selectors[:3], 3, {NODE_ID_LABEL: "h0"})


def test_an_unpinned_run_checks_nothing():
    assert worker_placement_problem(None, 0, {NODE_ID_LABEL: "x"}) is None
    assert worker_placement_problem([], 1, {}) is None


def test_bigger_nodes_of_the_same_gpu_host_a_plan_made_for_smaller_ones():
    from planner.hardware import cpu_device
    from rayquant.placement import match_node_types

    # A plan for 1-GPU A10G nodes runs on 4-GPU A10G nodes (by node id), and one made for a
    # 1-slot CPU node (a KubeRay pod, say) on a node where Ray counts 3 CPUs.
    a10g_plan = plan_of(node_plan("A10G:1", "A10G", 2, 1))
    quad = (NodeType(A10G, 4, 2, node_ids=("q0", "q1")),)
    check_cluster_can_host(a10g_plan, quad)
    assert worker_label_selectors(a10g_plan, quad, node_labels={}) == [
        {NODE_ID_LABEL: "q0"}, {NODE_ID_LABEL: "q1"}]
    cpu_plan = plan_of(node_plan("CPU:1", "CPU", 1, 1))
    check_cluster_can_host(cpu_plan, (NodeType(cpu_device(8 * GIB), 3, 1, node_ids=("c0",)),))
    # An exact match is preferred over a bigger node, and one node type hosts one plan type.
    both = (NodeType(A10G, 4, 2, node_ids=("q0", "q1")), NodeType(A10G, 1, 2, node_ids=("a0", "a1")))
    assert match_node_types(a10g_plan, both)["A10G:1"].gpus_per_node == 1
    # Fewer GPUs per node than planned, or too few nodes, still cannot host it.
    with pytest.raises(PlacementError, match="plan needs 2 nodes of H100-80GB:8"):
        check_cluster_can_host(MIXED, (NodeType(H100, 4, 2), NodeType(A10G, 1, 4)))
