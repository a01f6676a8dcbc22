"""tests/data/validation.json against the published measurements it copies (../shared/calibration/).

The figures, their labels (all check) and the predictions live in tests/data/validation.json and
planner/validation.py (tests/test_validation.py asserts on them); this keeps the copy true to the
shared file: every row present once, its measured value and setting as published.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.validation import load

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "calibration" / "published_measurements.json"
if not DATA.is_file():
    DATA = Path("/work/shared/calibration/published_measurements.json")
PUBLISHED = json.loads(DATA.read_text()) if DATA.is_file() else []
FIGURES = {f["published_index"]: f for f in load(ROOT / "tests" / "data" / "validation.json")
           if "published_index" in f}


@pytest.mark.skipif(not PUBLISHED, reason="../shared/calibration is not here")
@pytest.mark.parametrize("i", range(41))
def test_each_published_row_is_copied_as_published(i):
    row, fig = PUBLISHED[i], FIGURES[i]
    assert fig["role"] == "check" and row["source"] in fig["source"]
    if fig["compare"] == "not_represented":
        return
    if "measured_peak_gib" in row and row.get("measured_peak_gb_as_reported") is None:
        assert fig["measured"] == round(row["measured_peak_gib"] * 2**30)
    elif row["measured_peak_gb_as_reported"] == "OOM":
        assert fig["compare"] == "exceeds_device" and fig["measured"] == "OOM"
    else:
        assert fig["measured"] == round(row["measured_peak_gb_as_reported"] * 1e9)
    s = fig["setting"]
    assert s["micro_batch_size"] == row["batch_size"]
    if row.get("lora_rank"):
        assert s["lora_rank"] == row["lora_rank"]


def test_most_rows_with_a_setting_are_represented():
    assert sum(1 for f in FIGURES.values() if f["compare"] != "not_represented") >= 17
