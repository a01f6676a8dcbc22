"""The memory model against the figures of tests/data/validation.json, labelled fit or check.

Constants come from the fit rows only (scripts/fit_constants.py); these tests assert on the check
rows, and keep docs/planner.md's generated tables and the fitted constant in step with the data.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from planner.memory import overhead
from planner.validation import TARGET, load, median_error, rows

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "validation.json"
FIGURES = load(DATA)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table():
    return rows(FIGURES)


def test_every_figure_is_labelled_and_sourced():
    ids = [f["id"] for f in FIGURES]
    assert len(ids) == len(set(ids))
    for f in FIGURES:
        assert f["role"] in ("fit", "check"), f["id"]
        assert f["compare"] in ("equal", "upper_bound", "exceeds_device", "not_represented"), f["id"]
        assert f["source"], f["id"]
        assert f["compare"] != "not_represented" or f["reason"], f["id"]
    # Every H200 result and every published row is here, once.
    runs = sorted((ROOT / "docs" / "gpu").glob("2026-11-27-h200-run*.json"))
    ok = sum(1 for p in runs for r in json.loads(p.read_text())["results"] if r.get("status") == "ok")
    assert sum(1 for f in FIGURES if f["id"].startswith("h200-")) == ok
    assert sorted(f["published_index"] for f in FIGURES if "published_index" in f) == list(range(41))


def test_fit_rows_are_few_and_apart_from_the_checks():
    fit = [f for f in FIGURES if f["role"] == "fit"]
    assert 0 < len(fit) <= 3
    assert all(f["quantity"] == "max_context" for f in fit)


def test_the_fitted_constant_is_what_the_fit_rows_give():
    assert _script("fit_constants").fit_allocator_slack(FIGURES) == overhead.ALLOCATOR_SLACK


@pytest.mark.parametrize("quantity", ["peak_memory", "max_context"])
def test_check_rows_median_error_meets_the_target(table, quantity):
    assert median_error(table, quantity) <= TARGET


def test_check_rows_hold_their_comparison(table):
    """Each check row: upper bounds not below, published OOMs over the device; equal rows within
    10%, except the misses docs/planner.md names (small cards' fixed overheads, LitGPT's
    quantize-on-load transient), listed here by id with the error they must stay within."""
    known_misses = {"ctx-8B-8gb-unsloth": 0.75, "ctx-8B-12gb-hf": 0.4}
    for r in table:
        if r.role != "check":
            continue
        if r.id in known_misses:
            assert abs(r.error) <= known_misses[r.id], (r.id, r.error)
        elif r.id.startswith("published-") and r.compare == "equal":
            assert abs(r.error) <= 0.13, (r.id, r.error)  # LitGPT rows: -12.2% at most
        else:
            assert r.holds, (r.id, r.error)


def test_the_hf_backend_at_70b_no_longer_overshoots(table):
    (r,) = [r for r in table if r.id == "ctx-70B-80gb-hf"]
    assert r.measured == 6916 and 0.0 <= r.error <= TARGET  # was +38% (an OOM)


def test_the_docs_tables_are_generated_from_the_data():
    tables = _script("validation_tables")
    doc = (ROOT / "docs" / "planner.md").read_text(encoding="utf-8")
    assert tables.render(doc, tables.tables(FIGURES)) == doc, \
        "docs/planner.md is stale. To fix: python scripts/validation_tables.py"
