"""docker/Dockerfile (GPU) and docker/Dockerfile.cpu: built where a Docker daemon answers; everywhere,
linted for what makes the image reproducible: a pinned Ray base image of the Ray and Python the
project pins, every package from the lock or the registry at a pinned version (no local file, path,
wheel or URL), and COPY sources that exist and reach the build context."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from rayquant.k8s import DEFAULT_RAY_VERSION

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "cpu.lock"
DOCKERFILES = {"Dockerfile": "gpu", "Dockerfile.cpu": "cpu"}
# The one index besides the package registry: PyTorch's own, for the CPU build of torch (the
# registry's Linux torch wheel is the CUDA build).
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
LOCK_PYTHON = "py311"  # requirements/cpu.lock was resolved for Python 3.11


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        current += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, args = current.strip().partition(" ")
            out.append((word.upper(), args.strip()))
            current = ""
    return out


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def pip_installs(path: Path) -> list[list[str]]:
    """The arguments of every `pip install` the Dockerfile runs."""
    calls = []
    for word, args in instructions(path):
        if word != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", args):
            argv = shlex.split(command)
            if argv[:2] == ["pip", "install"] or argv[:4] == ["python", "-m", "pip", "install"]:
                calls.append(argv[argv.index("install") + 1:])
    return calls


def dockerignored(relpath: str) -> bool:
    """Whether .dockerignore keeps `relpath` out of the build context (last matching rule wins)."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = relpath.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[:i]), pattern) or
                  (pattern.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pattern[3:]))
                  for i in range(1, len(parts) + 1))
        if hit:
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_image_is_the_pinned_ray_of_the_lock(name):
    (base,) = [args for word, args in instructions(ROOT / "docker" / name) if word == "FROM"]
    image, _, tag = base.partition(":")
    assert image == "rayproject/ray" and tag, f"{name}: FROM {base} has no tag"
    version, python, platform = tag.split("-", 2)
    assert version == DEFAULT_RAY_VERSION == lock_pins()["ray"]  # the Ray pyproject and the lock pin
    assert python == LOCK_PYTHON
    if DOCKERFILES[name] == "gpu":
        assert re.fullmatch(r"cu\d{3}", platform), f"{name}: {tag} is not a CUDA image (-cuXYZ)"
    else:
        assert platform == "cpu"


def install_problems(path: Path, variant: str) -> list[str]:
    """What in a Dockerfile's `pip install`s does not come from the lock or the registry at a
    pinned version; empty when the lock (--no-deps) and this repository (--no-deps) are installed
    and nothing else but lock pins."""
    pins, problems = lock_pins(), []
    calls = pip_installs(path)
    installed_lock = installed_repo = False
    for argv in calls:
        text = " ".join(argv)
        if "file:" in text or ".whl" in text:
            problems.append(f"a local file: pip install {text}")
        for flag in {"-e", "--editable", "-f", "--find-links", "--extra-index-url"} & set(argv):
            problems.append(f"{flag} in pip install {text}")
        args = iter(argv)
        for arg in args:
            if arg == "--index-url":
                index = next(args, "")
                if index != TORCH_CPU_INDEX or variant != "cpu":
                    problems.append(f"--index-url {index}: not the registry")
            elif arg in ("-r", "--requirement"):
                if next(args, "") != "requirements/cpu.lock":
                    problems.append(f"pip install {text}: a requirements file other than the lock")
                elif "--no-deps" not in argv:
                    problems.append("the lock is complete: install it with --no-deps")
                else:
                    installed_lock = True
            elif arg.startswith("-"):
                continue
            elif arg == ".":
                if "--no-deps" not in argv:
                    problems.append("rayquant's dependencies come from the lock: install . with --no-deps")
                installed_repo = True
            else:
                package, sep, version = arg.partition("==")
                if not sep:
                    problems.append(f"{arg} is not pinned (name==version)")
                elif pins.get(package.lower()) != version:
                    problems.append(f"{arg} differs from the lock ({package}=={pins.get(package.lower())})")
    if not installed_lock:
        problems.append("requirements/cpu.lock is not installed")
    if not installed_repo:
        problems.append("rayquant (.) is not installed")
    return problems


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_installs_from_the_lock_and_the_registry_only(name):
    assert install_problems(ROOT / "docker" / name, DOCKERFILES[name]) == []


def test_the_lint_catches_installs_from_elsewhere(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:2.60.0-py311-cpu\n"
                   "RUN pip install torch && pip install --no-deps -r requirements/cpu.lock\n"
                   "RUN pip install /tmp/unsloth-1.0-py3-none-any.whl transformers==0.0.1\n"
                   "RUN pip install --find-links /opt/wheels \\\n    peft==1 && pip install -e .\n")
    problems = "\n".join(install_problems(bad, "gpu"))
    for expected in ("torch is not pinned", "a local file", "transformers==0.0.1 differs from the lock",
                     "--find-links", "-e in pip install", "install . with --no-deps"):
        assert expected in problems


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copied_paths_exist_and_reach_the_build_context(name):
    copies = [args for word, args in instructions(ROOT / "docker" / name) if word in ("COPY", "ADD")]
    assert copies
    for args in copies:
        argv = [a for a in shlex.split(args) if not a.startswith("--")]
        assert not any(a.startswith(("http://", "https://")) for a in argv), args
        for source in argv[:-1]:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such path in the repository"
            assert not dockerignored(source), f"{name}: COPY {source} is excluded by .dockerignore"
    assert dockerignored(".venv") and dockerignored(".git") and dockerignored("rayquant/__pycache__")


def _docker_daemon() -> str | None:
    """Why the images cannot be built here, or None when a Docker daemon answers."""
    if shutil.which("docker") is None:
        return "no docker command"
    probe = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                           text=True)
    return None if probe.returncode == 0 else f"no Docker daemon answers ({probe.stderr.strip()[:200]})"


@pytest.mark.skipif(_docker_daemon() is not None, reason=f"cannot build images: {_docker_daemon()}")
@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile"])
def test_image_builds_and_runs_rayquant(name):
    tag = f"rayquant-test:{DOCKERFILES[name]}"
    build = subprocess.run(["docker", "build", "-f", f"docker/{name}", "-t", tag, "."], cwd=ROOT,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    run = subprocess.run(["docker", "run", "--rm", tag, "rayquant", "plan", "--model", "rayquant/tiny-llama",
                          "--gpus", "1x1xCPU", "--json"], capture_output=True, text=True)
    assert run.returncode == 0 and '"model"' in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
