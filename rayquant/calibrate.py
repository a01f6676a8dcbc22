"""Measure real peak memory and tokens/s on this GPU and set them next to the planner's predictions.

Each case builds a real architecture with random weights from its config (nothing downloaded), loads
it through the worker's own loader (rayquant.loading.load_for_training: Unsloth or transformers+PEFT,
4-bit / FP8 / 16-bit), runs a few optimizer steps on random tokens and records
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` (reset after loading, so the peak is the
training peak with the weights resident, which is what the planner predicts) and tokens per second.
The results become a planner.calibration.Calibration for this GPU type.

Without CUDA, `check_cuda()` raises NoCudaError: `rayquant calibrate` prints its message and exits
with status 2, as for any input the machine cannot serve (rayquant.cli.errors); tests and
`scripts/gpu_check.py --cpu-smoke` run the same code on CPU with tiny models. With `--ray`, the cases
run once per GPU type of the cluster rayquant.cluster.connect joins.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from planner.calibration import Calibration, Measurement
from planner.plan import JobSpec, MemoryBreakdown, NodePlan, PlanError


class NoCudaError(RuntimeError):
    """Calibration needs a CUDA GPU and this machine has none."""


@dataclass(frozen=True)
class CalibrationCase:
    """One fixed configuration to measure."""

    model: str  # catalog id (random weights from its config) or a local model directory
    quantization: str  # bf16 | fp16 | nf4 | dynamic-4bit | fp8
    seq_len: int
    micro_batch_size: int
    backend: str = "unsloth"  # the worker's stack; "hf" = plain transformers + PEFT
    gradient_checkpointing: str = "unsloth"
    optimizer: str = "adamw_8bit"
    lora_rank: int = 16
    fp8_path: str | None = None  # None: by compute capability (planner.hardware.fp8_path_for)
    # dynamic-4bit: fraction of the 16-bit decoder-linear bytes the protected modules may add.
    protected_fraction: float = 0.05

    @property
    def label(self) -> str:
        fp8 = f"/{self.fp8_path}" if self.quantization == "fp8" and self.fp8_path else ""
        return (f"{self.model.rsplit('/', 1)[-1]} {self.quantization}{fp8} {self.backend} "
                f"s={self.seq_len} b={self.micro_batch_size}")


def check_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise NoCudaError(
            "rayquant calibrate measures real GPU memory and speed, and this machine has no CUDA GPU "
            f"(torch {torch.__version__}). To fix: run it on a GPU machine, or on a Ray cluster with "
            "`rayquant calibrate --model M --ray` (one task per GPU type).")


# ---- random-weight checkpoints ---------------------------------------------------------------------

def hf_config_dict(model: str) -> dict[str, Any]:
    """The config.json fields of a catalog model (or a local directory's config.json)."""
    p = Path(model)
    if (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text(encoding="utf-8"))
    from planner.catalog_models import MODEL_ROWS
    from planner.model import load_model_spec

    spec = load_model_spec(model)
    hub_id = spec.base_model or spec.name
    for row in MODEL_ROWS:
        if row[0] == hub_id:
            return dict(row[1])
    raise KeyError(f"{model} has no config in the catalog")


def random_checkpoint(model: str, out_dir: str | os.PathLike, device: str = "cpu") -> Path:
    """Write `model`'s architecture with random bf16 weights and a small tokenizer to out_dir.

    Reused when present; written to a temporary sibling and renamed so a crash leaves nothing half
    done. The tokenizer's vocabulary is smaller than the model's; the steps feed random token ids.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayquant.tiny import train_tokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    if Path(model, "config.json").is_file() and any(Path(model).glob("*.safetensors")):
        return Path(model)
    cfg = hf_config_dict(model)
    cfg.pop("architectures", None)
    cfg.pop("torch_dtype", None)
    model_type = cfg.pop("model_type")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    train_tokenizer(tmp)
    config = AutoConfig.for_model(model_type, **cfg)
    with torch.device(device):
        net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    net.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="5GB")
    del net
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()
    from planner.atomic import publish_mode

    publish_mode(tmp)
    os.replace(tmp, out)
    return out


# ---- one case ----------------------------------------------------------------------------------------

def _device_gpu_spec():
    """The planner's GpuSpec for this process's device (the CPU pseudo-device without CUDA)."""
    import torch

    from planner.hardware import cpu_device, generic_gpu, lookup_gpu

    if not torch.cuda.is_available():
        return cpu_device(), "cpu"
    name = torch.cuda.get_device_name(0)
    try:
        return lookup_gpu(name), name
    except PlanError:  # a GPU the catalog lacks: a generic one of its size
        return generic_gpu(torch.cuda.get_device_properties(0).total_memory / 2**30), name


def predict(case: CalibrationCase, spec, gpu, protected_bytes: int = 0) -> dict[str, Any]:
    """The planner's prediction for one case: peak and allocated bytes, breakdown, tokens/s."""
    from planner.memory import estimate_memory
    from planner.throughput import tokens_per_second

    est = estimate_memory(spec, gpu, quantization=case.quantization, backend=case.backend,
                          seq_len=case.seq_len, micro_batch_size=case.micro_batch_size,
                          lora_rank=case.lora_rank, gradient_checkpointing=case.gradient_checkpointing,
                          optimizer=case.optimizer, protected_bytes=protected_bytes)
    tps = tokens_per_second(spec, gpu, quantization=case.quantization, seq_len=case.seq_len,
                            micro_batch_size=case.micro_batch_size, lora_rank=case.lora_rank,
                            lora_targets=JobSpec().lora_targets,
                            gradient_checkpointing=case.gradient_checkpointing,
                            fp8_path=case.fp8_path, backend=case.backend, optimizer=case.optimizer)
    return {"estimate": est, "predicted_peak_bytes": est.peak_bytes,
            "predicted_allocated_bytes": est.allocated_bytes,
            "predicted_breakdown_bytes": est.breakdown.as_dict(),
            "predicted_tokens_per_second": float(tps)}


def _node_plan(case: CalibrationCase, gpu, fp8_path: str | None, protected_budget: int,
               est) -> tuple[NodePlan, JobSpec]:
    job = JobSpec(seq_len=case.seq_len, global_batch_size=case.micro_batch_size,
                  lora_rank=case.lora_rank, backend=case.backend, quantization=case.quantization)
    plan = NodePlan(
        node_type=f"{gpu.name}:1", gpu=gpu.name, nodes=1, gpus_per_node=1,
        quantization=case.quantization,
        compute_dtype="float16" if case.quantization == "fp16" else "bfloat16",
        micro_batch_size=case.micro_batch_size, gradient_accumulation_steps=1,
        optimizer=case.optimizer, gradient_checkpointing=case.gradient_checkpointing,
        placement="per-gpu", backend=case.backend, workers_per_node=1, gpus_per_worker=1,
        peak_memory_bytes=est.peak_bytes, memory_budget_bytes=est.capacity_bytes,
        breakdown=est.breakdown if isinstance(est.breakdown, MemoryBreakdown) else MemoryBreakdown(**est.breakdown),
        tokens_per_second=1.0, reasons={"calibration": "fixed configuration under measurement"},
        fp8_path=fp8_path if case.quantization == "fp8" else None,
        protected_budget_bytes=protected_budget)
    return plan, job


def _optimizer(name: str, params):
    import torch

    if name in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def measure_case(case: CalibrationCase, checkpoint_dir: str | os.PathLike, steps: int = 3,
                 warmup: int = 1) -> dict[str, Any]:
    """Load `checkpoint_dir` as `case` says, train `warmup + steps` steps, return the figures."""
    import torch

    from planner.hardware import fp8_path_for
    from rayquant.loading import load_for_training
    from planner.model import load_model_spec

    cuda = torch.cuda.is_available()
    gpu, device_name = _device_gpu_spec()
    spec = load_model_spec(str(checkpoint_dir))
    fp8_path = case.fp8_path
    if case.quantization == "fp8" and fp8_path is None:
        fp8_path = fp8_path_for(torch.cuda.get_device_capability(0)) if cuda else "rowwise"
    # 16-bit bytes of all decoder linears (bias included) times the fraction the case allows.
    budget = int(case.protected_fraction * 2 * spec.num_layers * sum(
        x.params for x in spec.linear_layers())) if case.quantization == "dynamic-4bit" else 0
    first = predict(case, spec, gpu)
    plan, job = _node_plan(case, gpu, fp8_path, budget, first["estimate"])

    t0 = time.perf_counter()
    model, _, info = load_for_training(str(checkpoint_dir), plan, job,
                                       device_map={"": 0} if cuda else {"": "cpu"})
    load_s = time.perf_counter() - t0
    protected_bytes = int(info.get("protected_cost_bytes", 0) or 0)
    pred = predict(case, spec, gpu, protected_bytes) if protected_bytes else first
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(case.optimizer, trainable)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (case.micro_batch_size, case.seq_len), generator=gen)
    ids = ids.to(device)
    model.train()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    losses, t_start = [], None
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            t_start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if cuda:
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t_start) / steps
    result = {
        **dataclasses.asdict(case), "fp8_path": fp8_path, "label": case.label,
        "gpu": gpu.name, "gpu_nvml_name": device_name, "status": "ok",
        **{k: v for k, v in pred.items() if k != "estimate"},
        "measured_allocated_bytes": int(torch.cuda.max_memory_allocated()) if cuda else 0,
        "measured_reserved_bytes": int(torch.cuda.max_memory_reserved()) if cuda else 0,
        "measured_tokens_per_second": case.micro_batch_size * case.seq_len / step_s,
        "step_s": step_s, "load_s": load_s, "losses": losses,
        "loaded": {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, list, type(None)))},
    }
    del model, opt, trainable, ids
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def to_measurement(result: dict[str, Any]) -> Measurement:
    fields = {f.name for f in dataclasses.fields(Measurement)}
    return Measurement(**{k: v for k, v in result.items() if k in fields})


def run_cases(cases: Iterable[CalibrationCase], workdir: str | os.PathLike, *, steps: int = 3,
              budget_s: float | None = None, on_result: Callable[[dict], None] | None = None,
              checkpoint_device: str | None = None) -> list[dict[str, Any]]:
    """Measure each case (one failure is recorded, not fatal), stopping once `budget_s` has passed."""
    import torch

    if checkpoint_device is None:
        checkpoint_device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = list(cases)
    if any(c.backend == "unsloth" for c in cases):
        try:  # Unsloth patches transformers when imported first; later imports run unpatched code
            import unsloth  # noqa: F401
        except ImportError:
            pass
    started = time.monotonic()
    results = []
    for case in cases:
        if budget_s is not None and time.monotonic() - started > budget_s:
            result = {**dataclasses.asdict(case), "label": case.label, "status": "skipped",
                      "error": f"time budget of {budget_s:.0f} s spent"}
        else:
            try:
                name = Path(case.model).name if Path(case.model).is_dir() else case.model.replace("/", "--")
                ckpt = random_checkpoint(case.model, Path(workdir) / name, checkpoint_device)
                result = measure_case(case, ckpt, steps=steps)
            except Exception as e:  # one configuration's failure must not lose the others
                result = {**dataclasses.asdict(case), "label": case.label, "status": "error",
                          "error": f"{type(e).__name__}: {e}"[:2000],
                          "traceback": traceback.format_exc()[-4000:]}
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def environment() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": str(torch.version.cuda), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for pkg in ("transformers", "peft", "trl", "bitsandbytes", "unsloth", "unsloth_zoo", "torchao",
                "accelerate"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = "absent"
    if torch.cuda.is_available():
        env["gpu_nvml_name"] = torch.cuda.get_device_name(0)
        cc = torch.cuda.get_device_capability(0)
        env["compute_capability"] = f"{cc[0]}.{cc[1]}"
    return env


def calibration_from(results: Iterable[dict[str, Any]]) -> Calibration:
    """A Calibration of the successful GPU measurements (CPU runs and failures are left out)."""
    ok = [to_measurement(r) for r in results
          if r.get("status") == "ok" and r.get("measured_allocated_bytes", 0) > 0]
    env = environment()
    return Calibration(measurements=tuple(ok), created=env["date_utc"], environment=env)


def format_table(results: Iterable[dict[str, Any]]) -> str:
    """Predicted vs measured, one line per case (GiB and tokens/s)."""
    gib = 2**30
    lines = [f"{'case':44} {'pred GiB':>8} {'alloc':>7} {'resv':>7} {'ratio':>6} "
             f"{'pred tok/s':>10} {'tok/s':>9} {'ratio':>6}"]
    for r in results:
        if r.get("status") != "ok":
            lines.append(f"{r.get('label', '?'):44} {r.get('status')}: {str(r.get('error', ''))[:70]}")
            continue
        pa, ma = r["predicted_allocated_bytes"], r["measured_allocated_bytes"]
        pt, mt = r["predicted_tokens_per_second"], r["measured_tokens_per_second"]
        lines.append(f"{r['label']:44} {pa / gib:8.2f} {ma / gib:7.2f} {r['measured_reserved_bytes'] / gib:7.2f} "
                     f"{(ma / pa if ma and pa else float('nan')):6.2f} {pt:10.0f} {mt:9.0f} "
                     f"{(mt / pt if pt else float('nan')):6.2f}")
    return "\n".join(lines)


# ---- a Ray cluster: one task per GPU type ---------------------------------------------------------

def _calibrate_here(cases: list[dict], workdir: str, steps: int, budget_s: float | None) -> dict:
    check_cuda()
    results = run_cases([CalibrationCase(**c) for c in cases], workdir, steps=steps, budget_s=budget_s)
    return {"results": results, "calibration": calibration_from(results).to_dict()}


def calibrate_cluster(cases: list[CalibrationCase], *, address: str | None = None, steps: int = 3,
                      budget_s: float | None = None, workdir: str = "/tmp/rayquant-calibrate"):
    """Run the cases once per GPU type of a Ray cluster, each as a task pinned to that type by its
    `accelerator_type:<T>` resource (Ray sets it on nodes whose GPU it recognises). Returns
    (results, merged Calibration)."""
    import ray

    from rayquant.cluster import connect

    connect(address, driver_logs=False)
    types = sorted({k.split(":", 1)[1] for node in ray.nodes() if node.get("Alive")
                    for k in node.get("Resources", {}) if k.startswith("accelerator_type:")})
    if not types:
        raise NoCudaError("no node of this Ray cluster advertises a GPU type (accelerator_type:*). "
                          "To fix: start the GPU nodes with `ray start --num-gpus N` on machines "
                          "with CUDA, or run `rayquant calibrate` on a GPU machine directly.")
    task = ray.remote(num_gpus=1)(_calibrate_here)
    raw = [dataclasses.asdict(c) for c in cases]
    refs = [task.options(resources={f"accelerator_type:{t}": 0.001}).remote(raw, workdir, steps, budget_s)
            for t in types]
    results, merged = [], Calibration(measurements=())
    for out in ray.get(refs):
        results.extend(out["results"])
        merged = merged.merged(Calibration.from_dict(out["calibration"]))
    return results, merged
