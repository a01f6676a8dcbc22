#!/usr/bin/env python3
"""Everything rayquant wants to know from a lent GPU, in one run that stops on a time budget.

1. the FP8 path: our row-scaled FP8 linear on this GPU (error vs bf16, speed of torch._scaled_mm vs a
   bf16 GEMM) and whether Unsloth's load_in_fp8 can run here;
2. predicted vs measured peak memory (max_memory_allocated / max_memory_reserved) and tokens/s for the
   planner's configurations on real architectures with random weights (nothing downloaded);
3. tokens/s of the worker's training step (Unsloth) against the same step in plain transformers+PEFT.

Each configuration is guarded, so one failure loses nothing else; results are rewritten to
$OUT/gpu_check.json after every step, with $OUT/calibration.json (planner.calibration format) and a
printed summary at the end. Runs without Ray. `--cpu-smoke` runs the same code on CPU with tiny models.

    PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --budget-s 420
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # Unsloth patches transformers only when imported first
    import unsloth  # noqa: F401
except Exception as e:  # recorded below; the FP8 kernel and hf checks still run
    UNSLOTH_IMPORT_ERROR = f"{type(e).__name__}: {e}"
else:
    UNSLOTH_IMPORT_ERROR = None

import torch  # noqa: E402

QWEN, LLAMA1B, LLAMA8B = "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.1-8B"


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def gpu_cases(cc: tuple[int, int]):
    """In priority order: what is cut when the budget runs out is at the end."""
    from rayquant.calibrate import CalibrationCase as C

    fp8 = cc >= (8, 9)
    hf = dict(backend="hf", gradient_checkpointing="hf")
    cases = [
        C(QWEN, "nf4", 512, 4), C(QWEN, "bf16", 512, 4), C(QWEN, "dynamic-4bit", 512, 4),
        *([C(QWEN, "fp8", 512, 4, fp8_path="rowwise")] if fp8 else []),
        *([C(QWEN, "fp8", 512, 4, fp8_path="unsloth")] if cc >= (9, 0) else []),
        C(QWEN, "nf4", 2048, 2), C(QWEN, "bf16", 2048, 2),
        C(LLAMA1B, "nf4", 1024, 2), C(LLAMA1B, "nf4", 1024, 2, **hf),
        C(LLAMA1B, "bf16", 1024, 2), C(LLAMA1B, "bf16", 1024, 2, **hf),
        C(LLAMA1B, "dynamic-4bit", 1024, 2),
        *([C(LLAMA1B, "fp8", 1024, 2, fp8_path="rowwise")] if fp8 else []),
        C(LLAMA1B, "nf4", 4096, 1),
        C(LLAMA8B, "nf4", 1024, 1),
        *([C(LLAMA8B, "fp8", 1024, 1, fp8_path="rowwise")] if fp8 else []),
        C(LLAMA8B, "bf16", 1024, 1),
    ]
    return cases


def smoke_cases(workdir: Path):
    from rayquant.calibrate import CalibrationCase as C
    from rayquant.tiny import make_tiny_model

    llama = str(make_tiny_model(workdir / "tiny-llama4", arch="llama", num_hidden_layers=4))
    qwen = str(make_tiny_model(workdir / "tiny-qwen2", arch="qwen2"))
    hf = dict(backend="hf", gradient_checkpointing="hf")
    return [C(llama, "nf4", 32, 2), C(llama, "bf16", 32, 2), C(llama, "dynamic-4bit", 32, 2),
            C(llama, "fp8", 32, 2, fp8_path="rowwise"), C(llama, "nf4", 32, 2, **hf),
            C(qwen, "nf4", 64, 1), C(qwen, "bf16", 64, 1, **hf)]


def fp8_kernel_check(device: torch.device, smoke: bool) -> dict:
    """Our FP8 linear on this device: error vs bf16 (output, input grad) and GEMM speed."""
    from rayquant.fp8 import Fp8RowwiseLinear, scaled_mm_rowwise_supported, unsloth_fp8_problems

    out = {"scaled_mm_rowwise_supported": scaled_mm_rowwise_supported(device),
           "unsloth_fp8_problems": unsloth_fp8_problems(), "shapes": []}
    shapes = [(64, 128, 32)] if smoke else [(4096, 4096, 4096), (4096, 4096, 14336), (4096, 14336, 4096)]
    for m, k, n in shapes:
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        fp8 = Fp8RowwiseLinear.from_linear(lin)
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        xr = x.detach().clone().requires_grad_(True)
        ref = lin(xr)
        y = fp8(x)
        g = torch.randn_like(ref)
        ref.backward(g)
        y.backward(g)
        rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
        row = {"m": m, "k": k, "n": n, "output_rel_error": rel(y, ref),
               "input_grad_rel_error": rel(x.grad, xr.grad)}
        iters = 3 if smoke else 50
        with torch.no_grad():
            for name, fn in (("bf16_ms", lambda: lin(x)), ("fp8_ms", lambda: fp8(x))):
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(iters):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                row[name] = (time.perf_counter() - t) / iters * 1e3
        row["fp8_speedup"] = row["bf16_ms"] / row["fp8_ms"]
        out["shapes"].append(row)
        del lin, fp8, x, xr, ref, y, g
    return out


def stack_ratios(results: list[dict]) -> list[dict]:
    """Unsloth vs plain transformers+PEFT tokens/s for the same model, scheme and shape."""
    key = lambda r: (r["model"], r["quantization"], r["seq_len"], r["micro_batch_size"])
    ok = [r for r in results if r.get("status") == "ok"]
    hf = {key(r): r for r in ok if r["backend"] == "hf"}
    return [{"model": r["model"], "quantization": r["quantization"], "seq_len": r["seq_len"],
             "micro_batch_size": r["micro_batch_size"],
             "unsloth_tokens_per_second": r["measured_tokens_per_second"],
             "hf_tokens_per_second": hf[key(r)]["measured_tokens_per_second"],
             "ratio": r["measured_tokens_per_second"] / hf[key(r)]["measured_tokens_per_second"],
             "unsloth_allocated_bytes": r["measured_allocated_bytes"],
             "hf_allocated_bytes": hf[key(r)]["measured_allocated_bytes"]}
            for r in ok if r["backend"] == "unsloth" and key(r) in hf]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting work after this")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="results folder")
    ap.add_argument("--workdir", default=None, help="where random-weight checkpoints go")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny models on CPU (checks the script)")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only matching cases")
    args = ap.parse_args()
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rayquant-gpu-check-"))
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("no CUDA GPU here: run on a GPU machine, or pass --cpu-smoke to check the script on CPU")
        return 2

    from rayquant.calibrate import calibration_from, environment, format_table, run_cases

    report = {"environment": environment(), "unsloth_import_error": UNSLOTH_IMPORT_ERROR,
              "budget_s": args.budget_s, "fp8_kernel": None, "results": [], "stack_ratios": []}
    path = out / "gpu_check.json"
    write_json(path, report)
    print(json.dumps(report["environment"]), flush=True)

    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    try:
        report["fp8_kernel"] = fp8_kernel_check(device, args.cpu_smoke)
    except Exception as e:
        report["fp8_kernel"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    write_json(path, report)
    print("fp8 kernel:", json.dumps(report["fp8_kernel"], default=str)[:1500], flush=True)

    cases = smoke_cases(workdir) if args.cpu_smoke else gpu_cases(torch.cuda.get_device_capability(0))
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        cases = [c for c in cases if any(w in c.label for w in wanted)]

    def on_result(r: dict) -> None:
        report["results"].append(r)
        report["stack_ratios"] = stack_ratios(report["results"])
        write_json(path, report)
        brief = {k: r.get(k) for k in ("label", "status", "error", "predicted_allocated_bytes",
                                        "measured_allocated_bytes", "measured_reserved_bytes",
                                        "predicted_tokens_per_second", "measured_tokens_per_second",
                                        "load_s", "step_s")}
        print(f"[{time.monotonic() - started:6.1f}s] {json.dumps(brief, default=str)}", flush=True)

    remaining = args.budget_s - (time.monotonic() - started)
    run_cases(cases, workdir, steps=args.steps, budget_s=max(remaining, 0.0), on_result=on_result)

    if cuda:
        try:
            calibration = calibration_from(report["results"])
            calibration.save(out / "calibration.json")
            report["calibration_factors"] = calibration.to_dict()["factors"]
        except Exception as e:
            report["calibration_error"] = f"{type(e).__name__}: {e}"
    write_json(path, report)
    summary = [format_table(report["results"]), "", "unsloth vs transformers+peft (tokens/s):"]
    summary += [f"  {r['model']} {r['quantization']} s={r['seq_len']} b={r['micro_batch_size']}: "
                f"{r['unsloth_tokens_per_second']:.0f} vs {r['hf_tokens_per_second']:.0f} = x{r['ratio']:.2f}"
                for r in report["stack_ratios"]]
    k = report["fp8_kernel"] or {}
    summary += ["", f"fp8 kernel: scaled_mm rowwise={k.get('scaled_mm_rowwise_supported')}, "
                f"unsloth load_in_fp8 problems={k.get('unsloth_fp8_problems')}"]
    summary += [f"  {s['m']}x{s['k']}x{s['n']}: out err {s['output_rel_error']:.4f}, grad err "
                f"{s['input_grad_rel_error']:.4f}, bf16 {s['bf16_ms']:.3f} ms, fp8 {s['fp8_ms']:.3f} ms "
                f"(x{s['fp8_speedup']:.2f})" for s in k.get("shapes", [])]
    summary.append(f"total {time.monotonic() - started:.0f} s; results in {path}")
    text = "\n".join(summary)
    (out / "summary.txt").write_text(text + "\n")
    print(text, flush=True)
    return 0 if any(r.get("status") == "ok" for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
