"""Re-derive the memory model's fitted constant from the fit rows of tests/data/validation.json.

Usage: python scripts/fit_constants.py [--check]

The memory model is read from the stack's source; one constant is fitted to data:
planner.memory.overhead.ALLOCATOR_SLACK, the caching allocator's slack at the memory limit as a
fraction of the step's transients. It is the value on a 0.01 grid in [0, 0.5] whose predicted
longest sequences best match the fit rows (least squares on log(predicted / measured)); no check
row takes part. --check exits 1 when the value in code differs (tests/test_validation.py runs the
same comparison).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.memory import overhead  # noqa: E402
from planner.validation import load, rows  # noqa: E402

DATA = ROOT / "tests" / "data" / "validation.json"
GRID = [round(0.01 * i, 2) for i in range(51)]


def _loss(fit_figures, slack: float) -> float:
    saved = overhead.ALLOCATOR_SLACK
    overhead.ALLOCATOR_SLACK = slack
    try:
        return sum(math.log(r.predicted / r.measured) ** 2 for r in rows(fit_figures))
    finally:
        overhead.ALLOCATOR_SLACK = saved


def fit_allocator_slack(figures=None) -> float:
    """ALLOCATOR_SLACK from the fit rows (coarse grid, then the 0.01 grid around its best)."""
    figures = load(DATA) if figures is None else figures
    fit = [f for f in figures if f["role"] == "fit" and f["compare"] == "equal"
           and f["quantity"] == "max_context"]
    if not fit:
        raise SystemExit("no fit rows for ALLOCATOR_SLACK in " + str(DATA))
    coarse = min(GRID[::5], key=lambda v: _loss(fit, v))
    near = [v for v in GRID if abs(v - coarse) <= 0.05 + 1e-9]
    return min(near, key=lambda v: (_loss(fit, v), v))


def main(argv: list[str]) -> int:
    derived = fit_allocator_slack()
    print(f"ALLOCATOR_SLACK = {derived} (in code: {overhead.ALLOCATOR_SLACK})")
    if "--check" in argv and derived != overhead.ALLOCATOR_SLACK:
        print("planner/memory/overhead.py differs from the fit rows. To fix: set ALLOCATOR_SLACK = "
              f"{derived}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
