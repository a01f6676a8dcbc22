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


def test_atomic_outputs_get_the_umask_permissions_not_private_ones(tmp_path):
    # Temporary files start 0600; a plan or manifest on shared storage must be readable like any file.
    import os

    from planner.atomic import write_atomically

    old = os.umask(0o022)
    try:
        path = write_atomically(tmp_path / "sub" / "plan.json", '{"a": 1}')
        again = write_atomically(path, b"{}")
    finally:
        os.umask(old)
    assert again.read_text() == "{}" and oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temporary file left


def test_import_rayquant_is_light_and_the_trainer_is_reachable_from_the_package():
    assert _loaded("import rayquant") == []
    code = ("import rayquant, rayquant.trainer\n"
            "assert rayquant.RayQuantTrainer is rayquant.trainer.RayQuantTrainer\n"
            "from rayquant import RayQuantTrainer, TrainResult\n"
            "assert 'RayQuantTrainer' in dir(rayquant)")
    subprocess.run([sys.executable, "-c", code], check=True)
    # Building a trainer object must not start the training stack either (it loads in fit()).
    assert _loaded("from rayquant import RayQuantTrainer") == []


def test_unknown_package_attribute_is_an_attribute_error():
    import rayquant

    try:
        rayquant.NoSuchThing  # noqa: B018
    except AttributeError as e:
        assert "NoSuchThing" in str(e)
    else:
        raise AssertionError("expected AttributeError")
