"""The memory model against the real H200 measurements of 2026-11-27 (docs/gpu-measurements.md).

Each ok case is re-predicted with today's planner (same model config, quantization, backend,
checkpointing, sequence length, micro-batch, LoRA rank, optimizer, and the protected bytes dynamic
4-bit really spent) and compared allocated-to-allocated (torch.cuda.max_memory_allocated, no CUDA
context, no allocator slack).

These are check rows (tests/data/validation.json): no constant is fitted to them, and the one
fitted constant (the allocator slack) is not part of an allocated-to-allocated comparison. The
tables in docs/planner.md and tests/test_validation.py hold them to 10%; this module keeps the
looser per-row tolerance of 15% and the reserved-memory check. The predictions run within 2% since
Unsloth's offload is modelled from its source (it was +2..+9% when every offloaded input was also
counted on the GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.hardware import lookup_gpu
from planner.memory import estimate_memory
from planner.model import load_model_spec

RUNS = sorted((Path(__file__).resolve().parent.parent / "docs" / "gpu").glob("2026-11-27-h200-run*.json"))
TOLERANCE = 0.15
# The hf-backend cases ran with Unsloth imported (rayquant.calibrate.run_cases imports it before any
# case when one case uses Unsloth), which replaces transformers' ForCausalLMLoss by
# UnslothForCausalLMLoss (unsloth_zoo/loss_utils.py: no `logits.float()` upcast, compiled CE), so the
# measured loss kept ~4 bytes per logit. The planner's hf backend models stock transformers (a worker
# that runs the hf backend without Unsloth: 16-bit logits + fp32 copy + fp32 log-softmax + fp32
# gradient, 14 bytes per logit; 16 with the fp32 head of prepare_model_for_kbit_training), what a worker
# without Unsloth really allocates. These cases can only bound the prediction from above: it must not
# under-predict, and must stay under 2.5x.
STOCK_HF_LOSS_NOT_MEASURED = "hf"


def _cases():
    for path in RUNS:
        for r in json.loads(path.read_text(encoding="utf-8"))["results"]:
            if r.get("status") == "ok":
                yield pytest.param(r, id=f"{path.stem[-4:]}:{r['label']}")


def _predict(r):
    spec = load_model_spec(r["model"])
    protected = int((r.get("loaded") or {}).get("protected_cost_bytes") or 0)
    return estimate_memory(
        spec, lookup_gpu(r["gpu"]), quantization=r["quantization"], backend=r["backend"],
        seq_len=r["seq_len"], micro_batch_size=r["micro_batch_size"], lora_rank=r["lora_rank"],
        gradient_checkpointing=r["gradient_checkpointing"], optimizer=r["optimizer"],
        protected_bytes=protected)


def test_runs_are_present():
    assert len(RUNS) == 2
    assert sum(1 for _ in _cases()) >= 10


@pytest.mark.parametrize("r", _cases())
def test_allocated_memory_matches_measurement(r):
    est = _predict(r)
    measured = r["measured_allocated_bytes"]
    ratio = est.allocated_bytes / measured
    if r["backend"] == STOCK_HF_LOSS_NOT_MEASURED:
        assert 1.0 <= ratio <= 2.5, f"{r['label']}: predicted/measured allocated {ratio:.3f}"
        return
    assert abs(ratio - 1.0) <= TOLERANCE, f"{r['label']}: predicted/measured allocated {ratio:.3f}"
    # The old model predicted 4x-5x for the small models (a 4 GiB CE target that Unsloth no longer uses).
    assert est.allocated_bytes < r["predicted_allocated_bytes"]


@pytest.mark.parametrize("r", _cases())
def test_reserved_memory_is_covered_by_the_budget(r):
    """What torch reserved (allocated + cached blocks, measured with no memory pressure) must fit the
    plan's budget for the predicted peak: the peak plus the safety margin a plan keeps free. Under
    pressure the caching allocator releases cached blocks and retries before it raises OOM, so the
    peak's slack models fragmentation at the limit, not this cache (docs/planner.md)."""
    if r["backend"] == STOCK_HF_LOSS_NOT_MEASURED:
        pytest.skip("hf cases measured with Unsloth's patched loss (see module docstring)")
    est = _predict(r)
    margin = 0.10 * est.capacity_bytes
    assert r["measured_reserved_bytes"] <= est.reserved_bytes + margin
