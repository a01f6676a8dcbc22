"""`import planner` and the CLI's startup import no heavy module."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "ray", "transformers", "yaml", "peft", "trl", "unsloth", "bitsandbytes", "numpy")


def _loaded(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout.split()
    return [m for m in HEAVY if m in out]


def test_import_planner_is_light():
    assert _loaded("import planner, planner.search, planner.memory, planner.throughput, planner.layermap") == []


def test_cli_module_is_light():
    assert _loaded("import rayquant.cli") == []
