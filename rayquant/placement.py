"""Where each Ray Train worker runs: per-worker label selectors, and whether the cluster can host a plan.

Ray Train 2.60 takes one label selector per worker (`ScalingConfig(label_selector=[...])`, one dict per
bundle of the worker group's placement group, see ray/train/v2/api/config.py). After the workers start,
Ray Train assigns world ranks by grouping workers by node in the order each node first appears
(`WorkerGroup._assign_worker_ranks`). So rank i lands on the node type the plan gives rank i only when
the plan lists each node's workers contiguously; `check_cluster_can_host` checks that too.

A worker is pinned by the `rayquant.io/node-type` label when every node of its type carries it (KubeRay
pods do, set by the k8s renderer); otherwise by `ray.io/node-id` of the plan's node of that type.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Mapping, Sequence

from planner.hardware import CPU_DEVICE
from planner.plan import PlanError, TrainingPlan

NODE_TYPE_LABEL = "rayquant.io/node-type"
NODE_ID_LABEL = "ray.io/node-id"  # Ray's own label on every node (ray._raylet.RAY_NODE_ID_KEY)
_LABEL_VALUE_MAX = 63  # Kubernetes label value syntax, which Ray enforces (ray/_private/label_utils.py)


class PlacementError(PlanError):
    """The cluster cannot host the plan, or a worker is not where the plan put it."""


def node_type_label_value(node_type: str) -> str:
    """A plan's node type key as a label value: "H100-80GB:8" -> "H100-80GB-8"."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", node_type).strip("-_.")[:_LABEL_VALUE_MAX]
    return value.rstrip("-_.")


def rank_order_problems(plan: TrainingPlan) -> list[str]:
    """Problems with the order of the plan's workers for Ray Train's rank assignment (see module doc)."""
    seen: set[tuple[str, int]] = set()
    previous = None
    for w in plan.workers:
        node = (w.node_type, w.node_index)
        if node != previous and node in seen:
            return [f"worker {w.rank} returns to node {w.node_type}#{w.node_index} after other nodes; "
                    f"Ray Train numbers ranks node by node, so rank {w.rank} would run elsewhere. "
                    f"Re-plan with `rayquant plan` (plans list each node's workers together)"]
        seen.add(node)
        previous = node
    return []


def match_node_types(plan: TrainingPlan, node_types) -> dict[str, Any]:
    """Plan node type -> the cluster's node type that hosts it: the same key, else nodes of the
    same GPU with at least as many GPUs (CPUs for the CPU pseudo-device) per node, so a plan made
    for `A10G:1` runs on 4-GPU A10G nodes and one for `CPU:2` on a node with 8 CPUs. Each cluster
    node type hosts at most one plan node type; unmatched plan types are left out."""
    available = {nt.key: nt for nt in node_types}
    matched: dict[str, Any] = {}
    for p in plan.node_plans:
        if p.node_type in available and available[p.node_type].count >= p.nodes:
            matched[p.node_type] = available.pop(p.node_type)
    for p in plan.node_plans:
        if p.node_type in matched:
            continue
        fits = [nt for nt in available.values() if nt.gpu.name == p.gpu
                and nt.gpus_per_node >= p.gpus_per_node and nt.count >= p.nodes]
        if fits:
            best = min(fits, key=lambda nt: (nt.gpus_per_node, nt.key))
            matched[p.node_type] = available.pop(best.key)
    return matched


def check_cluster_can_host(plan: TrainingPlan, node_types, cpus_per_worker: int = 1) -> None:
    """Raise PlacementError naming everything the cluster lacks for this plan (all at once)."""
    available = match_node_types(plan, node_types)
    problems = []
    for p in plan.node_plans:
        nt = available.get(p.node_type)
        have = nt.count if nt is not None else sum(
            x.count for x in node_types if x.key == p.node_type)
        if nt is None:
            others = ", ".join(f"{x.key} x{x.count}" for x in node_types) or "nothing"
            problems.append(
                f"plan needs {p.nodes} node{'s' * (p.nodes != 1)} of {p.node_type}, cluster has {have} "
                f"(it has: {others}) — a node went away since planning, or the plan is for another "
                f"cluster; re-plan with `rayquant plan` or add nodes")
            continue
        if p.workers_per_node * p.gpus_per_worker > nt.gpus_per_node and p.gpu != CPU_DEVICE:
            problems.append(f"{p.node_type}: {p.workers_per_node} workers x {p.gpus_per_worker} GPUs "
                            f"do not fit a node of {nt.gpus_per_node} GPUs; re-plan with `rayquant plan`")
        if nt.cpus_per_node and p.workers_per_node * cpus_per_worker > nt.cpus_per_node:
            problems.append(f"{p.node_type}: {p.workers_per_node} workers need "
                            f"{p.workers_per_node * cpus_per_worker} CPUs, its nodes have "
                            f"{nt.cpus_per_node}; give Ray more CPUs (`ray start --num-cpus`) or re-plan")
    problems += rank_order_problems(plan)
    if problems:
        raise PlacementError("the cluster cannot host this plan:\n  - " + "\n  - ".join(problems))


def _live_node_labels() -> dict[str, Mapping[str, str]]:
    """Labels of every alive node, when this process is connected to Ray (else empty)."""
    if "ray" not in sys.modules:
        return {}
    import ray

    if not ray.is_initialized():
        return {}
    return {n["NodeID"]: n.get("Labels") or {} for n in ray.nodes() if n.get("Alive")}


def worker_label_selectors(plan: TrainingPlan, node_types,
                           node_labels: Mapping[str, Mapping[str, str]] | None = None
                           ) -> list[dict[str, str]]:
    """One Ray label selector per worker, in rank order, for `ScalingConfig(label_selector=...)`.

    `node_types` is the cluster's inventory (rayquant.inventory); `node_labels` maps node id -> labels
    (None: read from the connected Ray cluster). Call `check_cluster_can_host` first.
    """
    available = match_node_types(plan, node_types)
    labels = _live_node_labels() if node_labels is None else node_labels
    selectors = []
    for w in plan.workers:
        value = node_type_label_value(w.node_type)
        nt = available.get(w.node_type)
        if nt is None or not nt.node_ids:
            # Offline inventory (a file or a spec): only the label can say where this type lives.
            selectors.append({NODE_TYPE_LABEL: value})
        elif all(labels.get(node_id, {}).get(NODE_TYPE_LABEL) == value for node_id in nt.node_ids):
            selectors.append({NODE_TYPE_LABEL: value})
        else:
            selectors.append({NODE_ID_LABEL: nt.node_ids[w.node_index]})
    return selectors


def resources_per_worker(plan: TrainingPlan, cpus_per_worker: int = 1) -> dict[str, float]:
    """The resources every worker reserves. Ray Train 2.60 gives all workers one bundle shape
    (worker_group.py: `bundles=[resources_per_worker] * num_workers`), so the plan's node types must
    agree on GPUs per worker."""
    shapes = {(p.gpu == CPU_DEVICE, 0 if p.gpu == CPU_DEVICE else p.gpus_per_worker)
              for p in plan.node_plans}
    if len(shapes) > 1:
        detail = ", ".join(f"{p.node_type}: {0 if p.gpu == CPU_DEVICE else p.gpus_per_worker}"
                           for p in plan.node_plans)
        raise PlacementError(
            f"Ray Train 2.60 reserves the same resources for every worker, but this plan's workers "
            f"need different GPU counts ({detail}): one job cannot mix node-spanning and per-GPU "
            f"workers.\nTo fix: train each node type in its own job (re-plan with only that type, "
            f"e.g. `rayquant plan --gpus 2x8xH100-80GB`), or re-plan so one GPU holds a worker "
            f"(`rayquant plan --quantization nf4`, a shorter --seq-len or a smaller micro-batch).")
    (is_cpu, gpus), = shapes
    resources: dict[str, float] = {"CPU": float(cpus_per_worker)}
    if not is_cpu:
        resources["GPU"] = float(gpus)
    return resources


def scaling_config_kwargs(plan: TrainingPlan, node_types,
                          node_labels: Mapping[str, Mapping[str, str]] | None = None,
                          cpus_per_worker: int = 1) -> dict[str, Any]:
    """Checked keyword arguments for `ray.train.ScalingConfig(**kwargs)` that place every rank."""
    check_cluster_can_host(plan, node_types, cpus_per_worker)
    resources = resources_per_worker(plan, cpus_per_worker)
    return {"num_workers": plan.num_workers, "use_gpu": "GPU" in resources,
            "resources_per_worker": resources,
            "label_selector": worker_label_selectors(plan, node_types, node_labels)}


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether node `labels` satisfy a Ray label selector (values: "v", "!v", "in(a,b)", "!in(a,b)")."""
    for key, expr in selector.items():
        negate = expr.startswith("!")
        expr = expr[1:] if negate else expr
        if expr.startswith("in(") and expr.endswith(")"):
            allowed = {v.strip() for v in expr[3:-1].split(",")}
        else:
            allowed = {expr}
        if (labels.get(key) in allowed) == negate:
            return False
    return True


def worker_placement_problem(selectors: Sequence[Mapping[str, str]] | None, rank: int,
                             labels: Mapping[str, str]) -> str | None:
    """Why a worker on a node with `labels` must not train as `rank` (None: it is where its plan
    says, or the run pins no worker). `labels` include `ray.io/node-id`."""
    if not selectors:
        return None
    if rank >= len(selectors):
        return (f"rank {rank} has no placement: the run pins {len(selectors)} workers. Re-plan with "
                f"`rayquant plan` so the plan and the worker count agree.")
    if selector_matches(selectors[rank], labels):
        return None
    node = str(labels.get(NODE_ID_LABEL, "?"))[:12]
    return (f"rank {rank} runs on node {node} (labels {dict(labels)}) but its plan places it at "
            f"{dict(selectors[rank])}; Ray Train reordered the ranks or a node changed.\n"
            f"To fix: re-plan with `rayquant plan` against the live cluster (`rayquant inventory`).")


def check_worker_placement(selectors: Sequence[Mapping[str, str]] | None, rank: int) -> None:
    """Inside a Ray Train worker: refuse to train when this rank is not on the node its plan says."""
    import ray

    ctx = ray.get_runtime_context()
    labels = dict(ctx.get_node_labels())
    labels.setdefault(NODE_ID_LABEL, ctx.get_node_id())
    problem = worker_placement_problem(selectors, rank, labels)
    if problem:
        raise PlacementError(problem)
