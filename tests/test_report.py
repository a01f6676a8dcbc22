"""Renderings of plans for the console."""

from __future__ import annotations

from rayquant.report import GIB, gib, table


def test_gib_keeps_small_values_readable():
    assert gib(80 * GIB) == "80.00" and gib(1.234 * GIB, 1) == "1.2" and gib(0) == "0.00"
    # A tiny model's few megabytes must not print as 0.00 GiB.
    assert gib(3_000_000) == "0.0028" and gib(6.1e-5 * GIB) == "0.000061"


def test_table_aligns_columns():
    text = table(["name", "GiB"], [["a", "1.00"], ["long name", "10.00"]], right={1})
    lines = text.splitlines()
    assert lines[0] == "name         GiB" and lines[-1] == "long name  10.00"
    assert len({len(line) for line in lines}) == 1
