"""Every requirement a fresh machine installs is a registry pin: no local file, path or URL.

A lock line such as `unsloth @ file:///tmp/dl/unsloth.whl` installs on the machine that made the
lock and nowhere else; these tests keep that from coming back."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENT_FILES = sorted(p for p in (ROOT / "requirements").iterdir()
                           if p.suffix in {".lock", ".txt", ".in"})
# name[extras]==version, optionally followed by pip hash options.
PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9_,.-]+\])?==[0-9][A-Za-z0-9.!]*"
                 r"(\s+--hash=sha256:[0-9a-f]{64})*$")
# A requirement specifier without a direct reference: name[extras] and version clauses.
SPECIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9_,.-]+\])?"
                       r"(\s*(==|>=|<=|!=|~=|<|>)\s*[0-9][A-Za-z0-9.*!]*\s*,?)*(\s*;.*)?$")


def _requirement_lines(path: Path) -> list[tuple[int, str]]:
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append((number, line))
    return lines


def _not_from_registry(line: str) -> bool:
    return ("@" in line or "://" in line or line.startswith(("-e", "--", ".", "/", "~"))
            or "/" in line.split(";", 1)[0])


def test_there_is_a_lock_to_check():
    assert ROOT / "requirements" / "cpu.lock" in REQUIREMENT_FILES


@pytest.mark.parametrize("path", REQUIREMENT_FILES, ids=lambda p: p.name)
def test_requirement_files_name_only_registry_packages(path):
    bad = [f"{path.name}:{n}: {line}" for n, line in _requirement_lines(path) if _not_from_registry(line)]
    assert not bad, "not from the package registry:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", [p for p in REQUIREMENT_FILES if p.suffix == ".lock"], ids=lambda p: p.name)
def test_lock_lines_are_exact_pins_without_local_build_labels(path):
    # torch==2.13.0+cpu names a build on one index; torch==2.13.0 is what the registry serves.
    bad = [f"{path.name}:{n}: {line}" for n, line in _requirement_lines(path) if not PIN.match(line)]
    assert not bad, "a lock line must be name==version:\n" + "\n".join(bad)


def test_lock_has_one_pin_per_package():
    names = [re.split(r"[\[=]", line, maxsplit=1)[0].lower().replace("_", "-")
             for _, line in _requirement_lines(ROOT / "requirements" / "cpu.lock")]
    assert len(names) == len(set(names))


def test_pyproject_dependencies_are_specifiers_not_direct_references():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"]) + [d for group in project["optional-dependencies"].values()
                                            for d in group]
    bad = [d for d in deps if _not_from_registry(d) or not SPECIFIER.match(d)]
    assert not bad, f"pyproject.toml names requirements the registry cannot serve: {bad}"


@pytest.mark.parametrize("line", ["unsloth @ file:///tmp/dl/unsloth-2026.10.9-py3-none-any.whl",
                                  "torch==2.13.0+cpu", "./wheels/x.whl", "-e .",
                                  "pkg @ https://example.com/pkg.tar.gz", "--find-links /tmp/dl"])
def test_the_checks_catch_the_lines_that_lock_users_out(line):
    assert _not_from_registry(line) or not PIN.match(line)
