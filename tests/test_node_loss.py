"""A node lost mid-run: on a simulated two-node Ray cluster (ray.cluster_utils.Cluster; the head
offers no CPU to workers), the plan puts one worker on each node. While both train, the test removes
one node for real (Cluster.remove_node, at step 3, after the step-2 checkpoint). The driver sees the
node gone, re-plans on the node left (one worker carrying the whole global batch), resumes from the
checkpoint written by two workers, finishes, and records the restart.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from transformers import TrainerCallback

DATA = "examples/data/tiny_alpaca.jsonl"
MAX_STEPS = 6
PAUSE_AT_STEP = 3
CHECKPOINT_EVERY = 2


class PauseOnce(TrainerCallback):
    """At the end of `step`, the first time (the marker file says it happened): say so in `marker`
    and wait there, so the test removes a node while every rank is mid-run. The ranks never go on by
    themselves: Ray Train ends the worker group when it sees the lost node's worker gone."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_step_end(self, args, state, control, **kwargs):
        import pathlib

        marker = pathlib.Path(self.marker)
        if state.global_step != self.step or marker.exists():
            return
        marker.write_text(f"step {state.global_step}\n")
        for _ in range(3000):  # 10 minutes at most, should Ray Train never end this worker
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("node-loss")
    saved = os.environ.get("RAYQUANT_CACHE")
    os.environ["RAYQUANT_CACHE"] = str(root / "cache")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [c.add_node(num_cpus=1), c.add_node(num_cpus=1)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield {"cluster": c, "address": c.address, "nodes": nodes, "root": root}
    ray.shutdown()
    c.shutdown()
    if saved is None:
        os.environ.pop("RAYQUANT_CACHE", None)
    else:
        os.environ["RAYQUANT_CACHE"] = saved


@pytest.fixture(scope="module")
def lost(cluster):
    from rayquant.restarts import PROGRESS_FILE, last_checkpoint_step
    from rayquant.trainer import RayQuantTrainer

    root = cluster["root"]
    marker = root / "paused"
    trainer = RayQuantTrainer(
        model="rayquant/tiny-llama", dataset=DATA, address=cluster["address"],
        sft={"seq_len": 128, "global_batch_size": 8, "max_steps": MAX_STEPS, "learning_rate": 5e-3,
             "logging_steps": 1},
        run={"name": "node-loss", "storage_path": str(root / "runs"), "checkpoint_every_steps": CHECKPOINT_EVERY},
        callbacks=[PauseOnce(PAUSE_AT_STEP, str(marker))])
    before = trainer.plan()
    gone = cluster["nodes"][1]
    removed = {}

    def remove_when_paused():
        # Once the ranks wait at step 3 and Ray Train has registered the step-2 checkpoint (the
        # progress file the driver keeps says so): a checkpoint written but not yet registered when
        # a node goes is not resumed from.
        progress = root / "runs" / "node-loss" / PROGRESS_FILE
        for _ in range(6000):
            if marker.exists() and last_checkpoint_step(progress.parent) == CHECKPOINT_EVERY:
                cluster["cluster"].remove_node(gone)
                removed["node_id"] = gone.node_id
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=remove_when_paused, daemon=True)
    watcher.start()
    result = trainer.fit()
    watcher.join(timeout=60)
    return {"before": before, "result": result, "removed": removed, "left": cluster["nodes"][0].node_id}


@pytest.mark.ray
def test_the_plan_used_both_nodes(lost):
    before = lost["before"]
    assert before.num_workers == 2 and before.global_batch_size == 8
    assert [(p.node_type, p.nodes) for p in before.node_plans] == [("CPU:1", 2)]


@pytest.mark.ray
def test_a_lost_node_is_replanned_on_the_nodes_left_and_the_run_finishes(lost):
    result = lost["result"]
    assert lost["removed"], "the node was never removed: the run did not pause at step 3"
    workers = result.manifest["workers"]
    assert len(workers) == 1 and workers[0]["node_id"] == lost["left"]
    w = workers[0]
    # One worker carries the whole global batch: 8 sequences per step, as before.
    assert w["micro_batch_size"] * w["gradient_accumulation_steps"] == 8
    assert result.manifest["plan"]["global_batch_size"] == 8 and result.manifest["plan"]["num_workers"] == 1
    assert w["steps"] == MAX_STEPS and w["resumed_from_step"] == CHECKPOINT_EVERY
    assert result.manifest["loss"]["points"] == MAX_STEPS


@pytest.mark.ray
def test_the_lost_node_is_recorded(lost):
    restarts = lost["result"].manifest["run"]["restarts"]
    assert len(restarts) == 1
    r = restarts[0]
    # The ranks paused at the end of step 3, before reporting it: the last step the driver saw is 2.
    assert (r["cause"], r["node_type"], r["at_step"], r["resumed_from_step"]) == (
        "node_lost", "CPU:1", PAUSE_AT_STEP - 1, CHECKPOINT_EVERY)
    assert (r["before"]["nodes"], r["after"]["nodes"]) == (2, 1)
    assert (r["before"]["num_workers"], r["after"]["num_workers"]) == (2, 1)
    assert "global_batch_size" not in r["before"]  # unchanged
