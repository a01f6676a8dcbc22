"""Heterogeneous DDP is exact: the gradient of step 1, all-reduced over ranks that take different
micro-batches, accumulation and token counts, is the single-process gradient of the token mean
over the whole global batch.

Two real processes (torch.distributed.run, DDP over gloo on CPU, fp32) build the worker's own
SFTTrainer (rayquant.worker.sft.make_sft_trainer) over the shards train_loop_per_worker cuts
(rayquant.data.shard_indices): rank 0 trains micro-batch 1 x accumulation 3, rank 1 micro-batch
2 x accumulation 2, on tokenized alpaca rows of different lengths and prompt masks. A callback
captures the LoRA gradients at on_pre_optimizer_step, after DDP's all-reduce and before the
optimizer moves anything. Comparing gradients, not weights after Adam steps, matters: Adam's
per-element normalisation hides a wrong per-rank weighting.

The negative control runs the same trainer with the token weighting switched off (each rank's loss
the mean of its micro-batches' token means, as a plain DDP average would have it) and must fail
the same comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from planner.plan import JobSpec, MemoryBreakdown, NodePlan, TrainingPlan, WorkerAssignment
from train_callbacks import free_port

DATA = "examples/data/tiny_alpaca.jsonl"
SEQ_LEN = 96  # the tokenizer is character-level: some rows are cut at 96, most are shorter
SEED = 0
SHAPES = ((1, 3), (2, 2))  # (micro-batch, accumulation) of rank 0 and rank 1
GLOBAL_BATCH = sum(m * a for m, a in SHAPES)
# fp32: summing the same terms in another order (per rank, then over ranks) moves a gradient by a
# few float32 ulps of its magnitude; a wrong weighting moves it by percents.
RTOL = 1e-5  # measured: 1.1e-7 (token-weighted DDP); the plain average is off by 0.30


def fp32_plan(backend: str = "hf") -> TrainingPlan:
    job = JobSpec(seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, lora_rank=4, lora_alpha=8,
                  quantization="bf16", optimizer="adamw_torch", backend=backend)
    nodes = tuple(
        NodePlan(node_type=f"CPU:{k}", gpu="CPU", nodes=1, gpus_per_node=1, quantization="bf16",
                 compute_dtype="float32", micro_batch_size=m, gradient_accumulation_steps=a,
                 optimizer="adamw_torch", gradient_checkpointing="none", placement="per-gpu",
                 backend=backend, workers_per_node=1, gpus_per_worker=1, peak_memory_bytes=2**30,
                 memory_budget_bytes=4 * 2**30, breakdown=MemoryBreakdown(1, 1, 1, 1, 1, 1, 1),
                 tokens_per_second=1.0, reasons={"test": "hand-built heterogeneous fp32 plan"})
        for k, (m, a) in enumerate(SHAPES))
    return TrainingPlan(model="tiny", model_summary={"name": "tiny-llama"}, job=job, node_plans=nodes,
                        workers=(WorkerAssignment(0, "CPU:0", 0, 0), WorkerAssignment(1, "CPU:1", 0, 0)))


def perturb_lora_b(model) -> None:
    """LoRA's B starts at zero, which makes every A gradient zero at step 1: give A and B seeded
    values, the same on every rank and in the reference whichever library built the adapters, so
    both A and B gradients are compared."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    for name, p in sorted(model.named_parameters()):
        if "lora_A" in name or "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)


# One process per rank: the worker's trainer over its shard; step 1's all-reduced LoRA gradients
# and the rows of each micro-batch, for the token-weighted run and the plain-average control.
_RANK = textwrap.dedent("""
    import json, os, sys
    if sys.argv[5] == "unsloth":
        import unsloth  # before transformers, as the worker does
    import torch
    from datasets import Dataset
    from planner.plan import TrainingPlan
    from rayquant.contract import SftSettings
    from rayquant.data import shard_indices
    from rayquant.loading import load_for_training
    from rayquant.worker.sft import make_sft_trainer
    from test_exact_gradients import perturb_lora_b
    from train_callbacks import RowLog, StepOneGradients

    model_dir, rows_file, plan_file, out = sys.argv[1:5]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    plan = TrainingPlan.load(plan_file)
    _, node_plan = plan.for_rank(rank)
    with open(rows_file) as f:
        data = Dataset.from_list(json.load(f))
    per_rank = [plan.for_rank(r)[1].samples_per_step for r in range(world)]
    shard = data.select(shard_indices(len(data), per_rank, rank))
    settings = SftSettings(max_steps=1, seq_len=plan.job.seq_len, dataset_format="alpaca",
                           learning_rate=1e-3, lr_scheduler="constant", warmup_steps=0, weight_decay=0.0,
                           max_grad_norm=0.0, logging_steps=1, seed=0)
    for mode in ("token", "plain"):
        model, tok, _ = load_for_training(model_dir, node_plan, plan.job, device_map={"": "cpu"}, seed=0)
        perturb_lora_b(model)
        grads = StepOneGradients()
        trainer, _ = make_sft_trainer(model, tok, shard, node_plan, settings, os.path.join(out, mode),
                                      [grads, RowLog(os.path.join(out, mode))])
        if mode == "plain":  # the control: each rank's loss a mean of micro-batch means, DDP averages
            trainer.model_accepts_loss_kwargs = False
            trainer.args.average_tokens_across_devices = False
        trainer.train()
        torch.save(grads.grads, os.path.join(out, f"{mode}_rank{rank}.pt"))
        with open(os.path.join(out, f"{mode}_rank{rank}.json"), "w") as f:
            json.dump({"engine": type(trainer.model_wrapped).__name__}, f)
    # A clean shutdown: left to interpreter exit, gloo's threads can abort a rank (SIGABRT) after
    # it finished.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
""")


def _tokenized_rows(model_dir, data):
    """The rows as the driver tokenizes them (rayquant.tokens), in the shuffled order shards are cut from."""
    from transformers import AutoTokenizer

    from rayquant.data import prepare
    from rayquant.tokens import tokenize

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return tokenize(prepare(str(data), shuffle_seed=SEED), tokenizer, SEQ_LEN).dataset


def _reference_gradients(model_dir, rows):
    """One process, no DDP: the token mean of the shifted cross-entropy over all `rows` (each row
    run alone, so no padding is involved), its gradient with respect to every LoRA parameter."""
    import torch
    import torch.nn.functional as F

    from rayquant.loading import load_for_training

    plan = fp32_plan()
    torch.manual_seed(0)
    model, _, _ = load_for_training(str(model_dir), plan.node_plans[0], plan.job, device_map={"": "cpu"}, seed=0)
    perturb_lora_b(model)
    model.train()
    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor(row["labels"][1:])
        logits = model(input_ids=ids).logits[0, :-1].float()
        keep = labels != -100
        total = total + F.cross_entropy(logits[keep], labels[keep], reduction="sum")
        count += int(keep.sum())
    (total / count).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _relative_error(got, want) -> float:
    import torch

    assert got.keys() == want.keys()
    num = torch.sqrt(sum(((got[k] - want[k]) ** 2).sum() for k in want))
    den = torch.sqrt(sum((want[k] ** 2).sum() for k in want))
    return float(num / den)


@pytest.fixture(scope="module", params=["hf", "unsloth"])
def ddp_step(request, tiny_llama_dir, tmp_path_factory):
    import torch

    tmp = tmp_path_factory.mktemp("exact")
    from train_callbacks import unique_alpaca

    unique_alpaca(DATA, tmp / "data.jsonl")
    rows = _tokenized_rows(tiny_llama_dir, tmp / "data.jsonl")
    (tmp / "rows.json").write_text(json.dumps(rows.to_list()))
    (tmp / "plan.json").write_text(fp32_plan(request.param).to_json())
    script = tmp / "rank.py"
    script.write_text(_RANK)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), str(script), str(tiny_llama_dir), str(tmp / "rows.json"), str(tmp / "plan.json"),
         str(tmp / "out"), request.param], env=env, cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from train_callbacks import trained_rows

    out = tmp / "out"
    ids = {tuple(r): i for i, r in enumerate(rows["input_ids"])}
    assert len(ids) == len(rows)  # every row is told apart by its tokens
    result = {mode: {"grads": [torch.load(out / f"{mode}_rank{r}.pt") for r in (0, 1)],
                     "engine": [json.loads((out / f"{mode}_rank{r}.json").read_text())["engine"] for r in (0, 1)],
                     "micro_batches": [[[ids[tuple(x)] for x in batch] for _, _, batch in trained_rows(out / mode, r)]
                                       for r in (0, 1)]}
              for mode in ("token", "plain")}
    return result, rows


def test_step_one_trains_the_first_global_batch_in_each_ranks_shape(ddp_step):
    result, rows = ddp_step
    assert result["token"]["engine"] == ["DistributedDataParallel"] * 2
    micro = result["token"]["micro_batches"]
    # rank 0: three micro-batches of one row, rank 1: two of two, together the first global batch
    assert micro[0] == [[0], [1], [2]]
    assert micro[1] == [[3, 4], [5, 6]]
    lengths = [len(rows[i]["input_ids"]) for i in range(GLOBAL_BATCH)]
    trainable = [sum(t != -100 for t in rows[i]["labels"][1:]) for i in range(GLOBAL_BATCH)]
    assert len(set(lengths)) > 3 and len(set(trainable)) > 3  # rows really differ in length and tokens
    assert sum(trainable[:3]) != sum(trainable[3:])  # and the ranks in token counts


def test_all_reduced_gradient_is_the_full_batch_token_mean(ddp_step, tiny_llama_dir):
    import torch

    result, rows = ddp_step
    want = _reference_gradients(tiny_llama_dir, rows.select(range(GLOBAL_BATCH)))
    g0, g1 = result["token"]["grads"]
    assert all(torch.equal(g0[k], g1[k]) for k in g0)  # all-reduced: every rank holds the same
    assert any(want[k].abs().max() > 0 for k in want if "lora_A" in k)  # A gradients are live
    error = _relative_error(g0, want)
    print(f"token-weighted DDP vs full batch: relative error {error:.2e}")
    assert error < RTOL, error
    for k in want:  # and parameter by parameter, not only overall
        torch.testing.assert_close(g0[k], want[k], rtol=RTOL, atol=RTOL * float(want[k].abs().max()))


def test_plain_per_rank_averaging_fails_the_same_comparison(ddp_step, tiny_llama_dir):
    result, rows = ddp_step
    want = _reference_gradients(tiny_llama_dir, rows.select(range(GLOBAL_BATCH)))
    plain = result["plain"]["grads"][0]
    assert result["plain"]["micro_batches"] == result["token"]["micro_batches"]  # the same rows
    error = _relative_error(plain, want)
    print(f"plain per-rank averaging vs full batch: relative error {error:.2e}")
    assert error > 100 * RTOL, error
