"""Fit the throughput model's constants from the fit rows of planner/data/throughput_points.json,
write them to planner/throughput_fit.py, and write the tokens/s table of docs/planner.md.

    python scripts/fit_throughput.py           # rewrite both
    python scripts/fit_throughput.py --check   # exit 1 if either is out of date

The order of the fit (each step uses only fit rows and what the steps before it fixed):
1. FP8 GEMMs as the workers run them (row-wise casts, eager): from the FP8 kernel rows, the 16-bit
   kernel efficiency, then the bytes per activation element the cast costs (least squares), with
   FP8 GEMMs at the same fraction of their peak as 16-bit ones.
2. The achievable fraction of the dense peak per GPU class: from the rows of the compiled stack
   (torch.compile; no fixed cost assumed there) in 16-bit or 4-bit, solved per row, geometric mean
   per class; the mean of the classes for classes without rows.
3. The FP8 rate of compiled float8 training relative to the 16-bit one (torchao rows).
4. The host time per decoder layer of the unsloth, hf and torchtune-eager stacks (Python and kernel launches,
   which the GPU's work hides when it is longer): solved per fit row, averaged per stack.
5. The expected error: the median of |predicted/measured - 1| over the check rows.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner import throughput as tp  # noqa: E402
from planner.hardware import lookup_gpu  # noqa: E402
from planner.model import load_model_spec  # noqa: E402

POINTS = ROOT / "planner" / "data" / "throughput_points.json"
FIT_MODULE = ROOT / "planner" / "throughput_fit.py"
DOC = ROOT / "docs" / "planner.md"
BEGIN = "<!-- tokens/s table: written by scripts/fit_throughput.py, do not edit -->"
END = "<!-- end of tokens/s table -->"
TARGET = 0.20  # issue 11: median error on the check rows for tokens/s


def load_points(path: Path = POINTS) -> list[dict]:
    return json.loads(path.read_text())["points"]


def _sig(x: float, digits: int = 3) -> float:
    """x rounded to `digits` significant figures (the constants as written)."""
    return 0.0 if x == 0 else round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _settings(row: dict) -> dict:
    keys = ("quantization", "seq_len", "micro_batch_size", "lora_rank", "lora_targets", "full_finetune",
            "gradient_checkpointing", "optimizer", "stack", "fp8_path")
    out = {k: row[k] for k in keys if k in row}
    out["num_shards"] = row.get("num_shards", 1)
    out["fp8_all_gemms"] = row.get("fp8_all_gemms", False)
    out["lora_rank"] = out.get("lora_rank") or 16
    return out


def predict(row: dict, fit: dict) -> float:
    """Predicted tokens/s of a train row under the constants `fit`."""
    model, gpu = load_model_spec(row["model"]), lookup_gpu(row["gpu"])
    return tp.step_time(model, gpu, fit=fit, **_settings(row)).tokens_per_second


def _gemm_times(row: dict, fit: dict) -> tuple[float, float]:
    """Predicted (bf16 ms, fp8 ms) of a kernel row: m x k times k x n, casting the m x k input."""
    gpu = lookup_gpu(row["gpu"])
    flops = 2.0 * row["m"] * row["k"] * row["n"]
    eff = fit["kernel_efficiency"]
    bf16 = flops / (gpu.tflops_16bit * 1e12 * eff)
    fp8 = (flops / (gpu.fp8_tflops * 1e12 * eff * fit["fp8_relative_eager"])
           + row["m"] * row["k"] * fit["fp8_cast_bytes"] / (gpu.bandwidth_gb_per_s * 1e9))
    return bf16 * 1e3, fp8 * 1e3


def _solve(f, lo: float, hi: float, target: float) -> float:
    """x in [lo, hi] with f(x) = target, f increasing (bisection); the bound where none is inside."""
    if f(hi) <= target:
        return hi
    if f(lo) >= target:
        return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def fit_constants(points: list[dict]) -> dict:
    """The constants, from fit rows only (see the module docstring for the order)."""
    fit_rows = [r for r in points if r.get("role") == "fit"]
    train = [r for r in fit_rows if r["kind"] == "train"]
    fit: dict = {"gemm_efficiency": {}, "gemm_efficiency_default": 0.5, "fp8_relative_eager": 1.0,
                 "fp8_cast_bytes": 0.0, "fp8_relative_compiled": 1.0,
                 "fixed_seconds_per_layer": {s: 0.0 for s in tp.STACKS}}
    # 1. FP8 eager GEMMs from the kernel rows.
    kernels = [r for r in fit_rows if r["kind"] == "gemm"]
    effs = [2.0 * r["m"] * r["k"] * r["n"] / (r["bf16_ms"] / 1e3 * lookup_gpu(r["gpu"]).tflops_16bit * 1e12)
            for r in kernels]
    fit["kernel_efficiency"] = _sig(statistics.fmean(effs))
    # The kernel fit rows share n (4096), so the FP8 rate and the cast cost cannot both be read off
    # them: FP8 GEMMs are taken to reach the same fraction of their (2x) peak as 16-bit ones
    # (assumption, FP8_RELATIVE_EAGER = 1), and the cast's bytes per input element are the least-
    # squares slope of what the FP8 time leaves over: fp8 s - flops / (fp8 peak x eff) = m*k * bytes / bw.
    fit["fp8_relative_eager"] = 1.0
    num = den = 0.0
    for r in kernels:
        gpu = lookup_gpu(r["gpu"])
        left = r["fp8_ms"] / 1e3 - 2.0 * r["m"] * r["k"] * r["n"] / (gpu.fp8_tflops * 1e12 * fit["kernel_efficiency"])
        elements_s = r["m"] * r["k"] / (gpu.bandwidth_gb_per_s * 1e9)
        num += elements_s * left
        den += elements_s * elements_s
    fit["fp8_cast_bytes"] = _sig(max(num / den, 0.0))

    # 2. GEMM efficiency per GPU class from the compiled stack's 16-bit and 4-bit rows.
    by_class: dict[str, list[float]] = {}
    for r in train:
        if r["stack"] != "compiled" or r["quantization"] == "fp8":
            continue
        cls = tp.gpu_class(lookup_gpu(r["gpu"]))

        def tps(e: float, r=r, cls=cls) -> float:
            return predict(r, {**fit, "gemm_efficiency": {cls: e}})

        by_class.setdefault(cls, []).append(_solve(tps, 0.05, 1.0, r["measured_tokens_per_second"]))
    fit["gemm_efficiency"] = {c: _sig(statistics.geometric_mean(v)) for c, v in sorted(by_class.items())}
    fit["gemm_efficiency_default"] = _sig(statistics.geometric_mean(list(fit["gemm_efficiency"].values())))

    # 3. Compiled float8 training relative to 16-bit.
    rel = [_solve(lambda x, r=r: predict(r, {**fit, "fp8_relative_compiled": x}), 0.1, 2.0,
                  r["measured_tokens_per_second"])
           for r in train if r["stack"] == "compiled" and r.get("fp8_all_gemms")]
    if rel:
        fit["fp8_relative_compiled"] = _sig(statistics.geometric_mean(rel))

    # 4. Host seconds per layer of the stacks but compiled: solved per row (the step is the
    #    longer of the GPU's work and the host's), averaged over the stack's fit rows.
    for stack in tp.STACKS:
        if stack == "compiled":
            continue
        per_layer = []
        for r in train:
            if r["stack"] != stack:
                continue

            def slower(f: float, r=r, stack=stack) -> float:
                return -predict(r, {**fit, "fixed_seconds_per_layer": {stack: f}})

            per_layer.append(_solve(slower, 0.0, 1.0, -r["measured_tokens_per_second"]))
        if per_layer:
            fit["fixed_seconds_per_layer"][stack] = _sig(statistics.fmean(per_layer))

    # 5. Expected error over the check rows.
    fit["expected_error"] = round(statistics.median(abs(e) for e in check_errors(points, fit)), 2)
    return fit


def errors(points: list[dict], fit: dict, role: str) -> list[tuple[dict, float, float]]:
    """(row, predicted, predicted/measured - 1) for the train rows of `role`."""
    out = []
    for r in points:
        if r.get("role") == role and r["kind"] == "train":
            p = predict(r, fit)
            out.append((r, p, p / r["measured_tokens_per_second"] - 1.0))
    return out


def check_errors(points: list[dict], fit: dict) -> list[float]:
    return [e for _, _, e in errors(points, fit, "check")]


def module_text(fit: dict) -> str:
    return f'''"""The throughput model's fitted constants. Written by scripts/fit_throughput.py from the fit rows
of planner/data/throughput_points.json; do not edit (tests/test_throughput_fit.py checks they match)."""

# Achievable fraction of the dense 16-bit peak in training GEMMs, per GPU class ("sm" + compute
# capability); classes without fit rows take the default (the classes' geometric mean).
GEMM_EFFICIENCY = {fit["gemm_efficiency"]!r}
GEMM_EFFICIENCY_DEFAULT = {fit["gemm_efficiency_default"]!r}
# Row-wise FP8 GEMMs run eagerly (Unsloth's FP8 path, rayquant/fp8.py): rate relative to the 16-bit
# efficiency on the FP8 peak, and bytes moved per input element by the activation cast (amax, scale,
# cast as separate kernels), at the peak bandwidth. 16-bit kernel efficiency of the same rows:
# {fit["kernel_efficiency"]!r}.
FP8_RELATIVE_EAGER = {fit["fp8_relative_eager"]!r}
FP8_CAST_BYTES_PER_ELEMENT = {fit["fp8_cast_bytes"]!r}
# torchao's compiled float8 training (all GEMMs FP8, casts fused): rate relative to 16-bit.
FP8_RELATIVE_COMPILED = {fit["fp8_relative_compiled"]!r}
# Host seconds per decoder layer per micro-step (Python, kernel launches): the step takes the longer
# of this x layers and the GPU's work.
FIXED_SECONDS_PER_LAYER = {fit["fixed_seconds_per_layer"]!r}
# Median |predicted/measured - 1| over the check rows: the +- shown with every prediction.
EXPECTED_ERROR = {fit["expected_error"]!r}
'''


def _setting(r: dict) -> str:
    q = r["quantization"] + (f" ({r['fp8_path']})" if r.get("fp8_path") else "")
    what = "full FT" if r["full_finetune"] else f"LoRA r{r['lora_rank']}"
    return (f"{r['model'].split('/')[-1]}, {r['gpu']}, {q}, {what}, {r['stack']}, "
            f"s={r['seq_len']} b={r['micro_batch_size']}, ckpt {r['gradient_checkpointing']}")


def table_text(points: list[dict], fit: dict) -> str:
    lines = ["| source | row | setting | predicted tok/s | measured tok/s | error | role |",
             "|---|---|---|---|---|---|---|"]
    for role in ("fit", "check"):
        for r, p, e in errors(points, fit, role):
            source = r["source"].split(" (")[0].split(";")[0]
            lines.append(f"| {source} | {r['id']} | {_setting(r)} | {p:,.0f} | "
                         f"{r['measured_tokens_per_second']:,.0f} | {e:+.0%} | {role} |")
    checks = check_errors(points, fit)
    med = statistics.median(abs(e) for e in checks)
    verdict = "meets" if med <= TARGET else "misses"
    lines += ["", f"Median |error| over the {len(checks)} check rows: **{med:.0%}** ({verdict} the "
              f"{TARGET:.0%} target). Within 25%: {sum(abs(e) <= 0.25 for e in checks)} of {len(checks)}; "
              f"worst: {max(checks, key=abs):+.0%}.", "",
              "FP8 kernel rows (H200, row-wise `torch._scaled_mm` with the activation cast, against the "
              "bf16 GEMM):", "",
              "| row | bf16 ms predicted / measured | fp8 ms predicted / measured | role |",
              "|---|---|---|---|"]
    for r in points:
        if r["kind"] == "gemm":
            b, f = _gemm_times(r, fit)
            lines.append(f"| {r['id']} | {b:.3f} / {r['bf16_ms']:.3f} | {f:.3f} / {r['fp8_ms']:.3f} | {r['role']} |")
    unused = [r for r in points if r.get("role") == "unused"]
    lines += ["", "Not used (why):", ""] + [f"- {r['id']} ({r['source']}): {r['why']}" for r in unused]
    return "\n".join(lines)


def doc_with_table(doc: str, table: str) -> str:
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC} lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the outputs are out of date")
    args = ap.parse_args(argv)
    points = load_points()
    fit = fit_constants(points)
    module = module_text(fit)
    doc = doc_with_table(DOC.read_text(), table_text(points, fit))
    stale = [p for p, text in ((FIT_MODULE, module), (DOC, doc)) if p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is out of date: run python scripts/fit_throughput.py")
        return 1 if stale else 0
    for p, text in ((FIT_MODULE, module), (DOC, doc)):
        if p in stale:
            p.write_text(text)
            print(f"wrote {p.relative_to(ROOT)}")
    print(f"check-row median error {fit['expected_error']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
