"""Inventory: grouping probed nodes into node types, inventory files, and a simulated mixed Ray cluster.

The Ray cluster is `ray.cluster_utils.Cluster` on this CPU machine: its nodes advertise GPUs the way
Ray does on real hardware (a `GPU` count, an `accelerator_type:<type>` resource, or the
`ray.io/accelerator-type` label), and NVML is absent, so the inventory falls back to those.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from planner.hardware import GIB, lookup_gpu
from planner.plan import PlanError
from rayquant.cli import main
from rayquant.inventory import (
    InventoryError,
    NodeProbe,
    _probe_from_report,
    load_inventory_file,
    local_node_types,
    node_types_from_probes,
    node_types_to_dicts,
    probe_notes,
)


def nvml_probe(node_id, name, count, memory_gib, cc=(8, 6), cpus=8, host_gib=64):
    return NodeProbe(node_id=node_id, gpu_names=(name,) * count,
                     gpu_memory_bytes=(int(memory_gib * GIB),) * count, compute_capabilities=(cc,) * count,
                     driver_version="550.54", host_memory_bytes=int(host_gib * GIB), cpus=cpus, source="nvml")


def ray_probe(node_id, ray_type, count, cpus=4, host_gib=32):
    return NodeProbe(node_id=node_id, gpu_names=(ray_type,) * count, gpu_memory_bytes=(0,) * count,
                     compute_capabilities=(), driver_version=None, host_memory_bytes=int(host_gib * GIB),
                     cpus=cpus, source="ray-resources")


def cpu_probe(node_id, cpus=4, host_gib=16):
    return NodeProbe(node_id=node_id, gpu_names=(), gpu_memory_bytes=(), compute_capabilities=(),
                     driver_version=None, host_memory_bytes=int(host_gib * GIB), cpus=cpus,
                     source="ray-resources")


# -- grouping ----------------------------------------------------------------------------------
def test_nodes_with_the_same_gpu_and_count_group_into_one_type_keeping_node_ids():
    probes = [nvml_probe("h1", "NVIDIA H100 80GB HBM3", 8, 79.6, (9, 0), host_gib=1000),
              nvml_probe("a1", "NVIDIA A10G", 1, 22.5),
              nvml_probe("h2", "NVIDIA H100 80GB HBM3", 8, 79.6, (9, 0), host_gib=990),
              nvml_probe("a2", "NVIDIA A10G", 1, 22.5, cpus=4),
              nvml_probe("a3", "NVIDIA A10G", 4, 22.5)]
    types = {nt.key: nt for nt in node_types_from_probes(probes)}
    assert set(types) == {"H100-80GB:8", "A10G:1", "A10G:4"}
    h100 = types["H100-80GB:8"]
    assert (h100.count, h100.node_ids, h100.gpu.compute_capability) == (2, ("h1", "h2"), (9, 0))
    assert h100.host_memory_bytes == 990 * GIB  # the smallest node of the group
    assert types["A10G:1"].node_ids == ("a1", "a2") and types["A10G:1"].cpus_per_node == 4
    assert types["A10G:4"].count == 1


def test_cpu_only_nodes_are_left_out_of_a_gpu_cluster_unless_asked():
    probes = [cpu_probe("head"), nvml_probe("a1", "NVIDIA A10G", 1, 22.5)]
    assert [nt.key for nt in node_types_from_probes(probes)] == ["A10G:1"]
    both = {nt.key: nt for nt in node_types_from_probes(probes, include_cpu_nodes=True)}
    assert set(both) == {"A10G:1", "CPU:4"}  # one worker slot per CPU
    assert both["CPU:4"].gpu.is_cpu and both["CPU:4"].gpu.memory_bytes == 16 * GIB


def test_a_cpu_only_cluster_becomes_the_cpu_pseudo_device_with_its_memory():
    (nt,) = node_types_from_probes([cpu_probe("n1", host_gib=16), cpu_probe("n2", host_gib=12)])
    assert nt.key == "CPU:4" and nt.count == 2 and nt.gpu.memory_bytes == 12 * GIB
    two = {nt.key for nt in node_types_from_probes([cpu_probe("n1", cpus=1), cpu_probe("n2", cpus=2)])}
    assert two == {"CPU:1", "CPU:2"}


def test_nodes_without_cpus_for_ray_cannot_host_workers():
    # A KubeRay head started with num-cpus 0.
    probes = [nvml_probe("head", "NVIDIA A10G", 1, 22.5, cpus=0), nvml_probe("a1", "NVIDIA A10G", 1, 22.5)]
    (nt,) = node_types_from_probes(probes)
    assert nt.node_ids == ("a1",)


def test_ray_accelerator_types_without_memory_take_the_smallest_variant():
    types = {nt.key for nt in node_types_from_probes(
        [ray_probe("x", "A100", 8), ray_probe("y", "A10G", 1), ray_probe("z", "H100", 8)])}
    assert types == {"A100-40GB:8", "A10G:1", "H100-80GB:8"}


def test_an_unknown_gpu_with_known_memory_is_planned_as_a_generic_gpu_and_noted():
    probe = nvml_probe("n", "NVIDIA Future GPU 9000", 2, 47.5)
    (nt,) = node_types_from_probes([probe])
    assert nt.gpu.generic and nt.gpu.memory_bytes == 47 * GIB and nt.gpus_per_node == 2
    assert any("generic 47GiB" in line for line in probe_notes([probe]))


def test_an_unknown_gpu_without_memory_is_a_clear_error():
    with pytest.raises(InventoryError, match="install nvidia-ml-py"):
        node_types_from_probes([ray_probe("n", "Mystery-X", 1)])


def test_a_node_with_mixed_gpus_is_planned_as_its_smallest_gpu():
    probe = NodeProbe("m", ("NVIDIA A10G", "NVIDIA L4"), (int(22.5 * GIB), int(22 * GIB)), ((8, 6), (8, 9)),
                      "550", 64 * GIB, 8, "nvml")
    (nt,) = node_types_from_probes([probe])
    assert nt.key == "L4:2"


def test_ray_may_offer_fewer_gpus_than_nvml_sees():
    report = {"nvml": {"gpus": [{"name": "NVIDIA A10G", "memory_bytes": 22 * GIB,
                                 "compute_capability": [8, 6]}] * 4, "driver": "550"},
              "host_memory_bytes": 64 * GIB, "cpus": 16}
    probe = _probe_from_report("n", report, {}, ray_gpus=2, ray_type="A10G")
    assert probe.gpu_count == 2 and "Ray offers 2" in probe.notes[0]
    assert _probe_from_report("n", report, {}, ray_gpus=None, ray_type=None).gpu_count == 4


def test_without_nvml_a_node_is_described_from_ray_resources():
    report = {"nvml": {"error": "NVML unavailable"}, "host_memory_bytes": 8 * GIB, "cpus": 2}
    probe = _probe_from_report("n", report, {}, ray_gpus=2, ray_type="A10G")
    assert probe.source == "ray-resources" and probe.gpu_names == ("A10G", "A10G")
    no_type = _probe_from_report("n", report, {}, ray_gpus=2, ray_type=None)
    assert no_type.gpu_count == 0 and "no accelerator type" in no_type.notes[0]


def test_this_machine_without_a_gpu_is_one_cpu_node_with_no_ray_node_id():
    (nt,) = local_node_types()
    assert nt.gpu.is_cpu and nt.count == 1 and nt.node_ids == ()
    assert nt.gpus_per_node == nt.cpus_per_node  # one worker slot per CPU
    assert nt.host_memory_bytes > 0 and nt.cpus_per_node >= 1


# -- files -------------------------------------------------------------------------------------
def test_inventory_rows_round_trip_through_json_and_yaml(tmp_path):
    types = node_types_from_probes([nvml_probe("h1", "NVIDIA H100 80GB HBM3", 8, 79.6, (9, 0)),
                                    nvml_probe("a1", "NVIDIA A10G", 1, 22.5)])
    rows = node_types_to_dicts(types)
    (tmp_path / "inv.json").write_text(json.dumps({"nodes": rows}))
    assert load_inventory_file(str(tmp_path / "inv.json")) == types
    import yaml

    (tmp_path / "inv.yaml").write_text(yaml.safe_dump(rows))
    assert load_inventory_file(str(tmp_path / "inv.yaml")) == types


@pytest.mark.parametrize("name,text,match", [
    ("bad.json", "{not json", "not valid JSON"),
    ("bad.yaml", "nodes: [", "not valid YAML"),
    ("empty.json", "[]", "must hold a list of node entries"),
    ("gpu.json", '[{"gpu": "H1OO", "count": 2}]', "unknown GPU 'H1OO'"),
])
def test_bad_inventory_files_say_what_is_wrong(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PlanError, match=match):
        load_inventory_file(str(path))


def test_a_missing_inventory_file_is_a_clear_error(tmp_path):
    with pytest.raises(InventoryError, match="cannot read inventory file"):
        load_inventory_file(str(tmp_path / "nope.json"))


def _plan(types):
    """A hand-built plan: (node type key, nodes, workers per node) per type, ranks node by node."""
    from planner.plan import JobSpec, MemoryBreakdown, NodePlan, TrainingPlan, WorkerAssignment

    node_plans, workers = [], []
    for key, nodes, per_node in types:
        node_plans.append(NodePlan(
            node_type=key, gpu=key.split(":")[0], nodes=nodes, gpus_per_node=int(key.split(":")[1]),
            quantization="nf4", compute_dtype="bfloat16", micro_batch_size=1, gradient_accumulation_steps=1,
            optimizer="adamw_8bit", gradient_checkpointing="unsloth", placement="per-gpu", backend="unsloth",
            workers_per_node=per_node, gpus_per_worker=1, peak_memory_bytes=1, memory_budget_bytes=2,
            breakdown=MemoryBreakdown(1, 0, 0, 0, 0, 0, 0), tokens_per_second=1.0, reasons={}))
        workers += [(key, n, local) for n in range(nodes) for local in range(per_node)]
    return TrainingPlan("tiny", {}, JobSpec(), node_plans,
                        [WorkerAssignment(r, *w) for r, w in enumerate(workers)])


# -- a simulated mixed Ray cluster -------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_cluster():
    """Head (CPU only), two A10G nodes (one by resource, one by label), one node of two H100s."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    a10g = [cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:A10G": 1}),
            cluster.add_node(num_cpus=1, num_gpus=1, labels={"ray.io/accelerator-type": "A10G"})]
    h100 = cluster.add_node(num_cpus=2, num_gpus=2, resources={"accelerator_type:H100": 1},
                            labels={"rayquant.io/node-type": "H100-80GB-2"})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield {"cluster": cluster, "a10g": [n.node_id for n in a10g], "h100": h100.node_id,
           "head": cluster.head_node.node_id}
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.ray
def test_live_cluster_nodes_group_by_gpu_type(mixed_cluster):
    from rayquant.inventory import discover_node_types

    types = {nt.key: nt for nt in discover_node_types()}
    assert set(types) == {"A10G:1", "H100-80GB:2"}
    assert set(types["A10G:1"].node_ids) == set(mixed_cluster["a10g"]) and types["A10G:1"].count == 2
    assert types["H100-80GB:2"].node_ids == (mixed_cluster["h100"],)
    assert types["H100-80GB:2"].cpus_per_node == 2 and types["A10G:1"].cpus_per_node == 1
    assert types["A10G:1"].host_memory_bytes > 0
    with_cpu = {nt.key: nt for nt in discover_node_types(include_cpu_nodes=True)}
    assert with_cpu["CPU:1"].node_ids == (mixed_cluster["head"],)


@pytest.mark.ray
def test_label_selectors_land_tasks_on_the_planned_node_type(mixed_cluster):
    import ray

    from rayquant.inventory import discover_node_types
    from rayquant.placement import NODE_ID_LABEL, NODE_TYPE_LABEL, check_cluster_can_host, worker_label_selectors
    plan = _plan((("H100-80GB:2", 1, 2), ("A10G:1", 2, 1)))
    types = discover_node_types()
    check_cluster_can_host(plan, types)
    selectors = worker_label_selectors(plan, types)  # labels read from the live cluster
    # The H100 node carries the rayquant label; the A10G nodes do not, so they are pinned by id.
    assert selectors[:2] == [{NODE_TYPE_LABEL: "H100-80GB-2"}] * 2
    assert [s[NODE_ID_LABEL] for s in selectors[2:]] == list(
        {nt.key: nt for nt in types}["A10G:1"].node_ids)

    @ray.remote(num_cpus=0)
    def where():
        return ray.get_runtime_context().get_node_id()

    landed = ray.get([where.options(label_selector=s).remote() for s in selectors])
    expected_type = {mixed_cluster["h100"]: "H100-80GB:2", **{n: "A10G:1" for n in mixed_cluster["a10g"]}}
    assert [expected_type[n] for n in landed] == [w.node_type for w in plan.workers]


@pytest.mark.ray
def test_cli_inventory_reads_the_live_cluster(mixed_cluster, tmp_path):
    out = tmp_path / "cluster.json"
    result = CliRunner().invoke(main, ["inventory", "--json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    by_gpu = {(r["gpu"], r["gpus_per_node"]): r for r in data["nodes"]}
    assert by_gpu[("A10G", 1)]["count"] == 2 and by_gpu[("H100-80GB", 2)]["count"] == 1
    assert any("no NVML" in n for n in data["notes"])
    # The written file plans offline.
    assert {nt.key for nt in load_inventory_file(str(out))} == {"A10G:1", "H100-80GB:2"}
    text = CliRunner().invoke(main, ["inventory"])
    assert text.exit_code == 0 and "A10G:1" in text.output and "H100-80GB:2" in text.output


def test_cli_inventory_local_and_bad_flags():
    runner = CliRunner()
    local = runner.invoke(main, ["inventory", "--local", "--json"])
    assert local.exit_code == 0
    assert json.loads(local.output)["nodes"][0]["count"] == 1
    both = runner.invoke(main, ["inventory", "--local", "--address", "x:6379"])
    assert both.exit_code == 2 and "drop --address" in both.output


def test_nvml_memory_decides_an_ambiguous_name():
    # A driver that reports only "A100" (some cloud images): the memory NVML reads picks the variant.
    (t,) = node_types_from_probes([nvml_probe("a", "A100", 4, 39.4, (8, 0))])
    assert t.gpu.name == "A100-40GB"
    (t,) = node_types_from_probes([nvml_probe("b", "NVIDIA A100", 4, 79.2, (8, 0))])
    assert t.gpu.name == "A100-80GB"
