"""The commands docs/kubernetes.md and the README's Kubernetes section tell users to run are the real
ones: every `rayquant ...` line parses with the real CLI (its flags exist and take the values given),
and every `docker build -f FILE` names a Dockerfile of the repository."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from rayquant.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "docs" / "kubernetes.md", ROOT / "README.md"]


def shell_lines(path: Path) -> list[str]:
    """The command lines of the page's ```bash blocks, continuation lines joined, comments cut."""
    text = path.read_text()
    if path.name == "README.md":  # only its Kubernetes section
        start = text.index("## Kubernetes (KubeRay)")
        end = text.find("\n## ", start + 1)
        text = text[start:end if end != -1 else None]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def rayquant_lines() -> list[tuple[str, str]]:
    return [(p.name, line) for p in PAGES for line in shell_lines(p) if line.startswith("rayquant ")]


def test_the_pages_show_rayquant_k8s_with_the_new_options():
    k8s_lines = [line for _, line in rayquant_lines() if line.startswith("rayquant k8s ")]
    assert len(k8s_lines) >= 4
    used = " ".join(k8s_lines)
    for flag in ("--image-pull-secret", "--service-account", "--storage-secret", "--hf-token-secret"):
        assert flag in used


@pytest.mark.parametrize("page, line", rayquant_lines(), ids=lambda v: v if len(v) < 40 else v[:40])
def test_every_rayquant_command_line_parses_with_the_real_cli(page, line):
    argv = shlex.split(line)[1:]
    with click.Context(main, info_name="rayquant") as ctx:
        command = main.get_command(ctx, argv[0])
        assert command is not None, f"{page}: no command `rayquant {argv[0]}`"
        try:
            command.make_context(argv[0], argv[1:], parent=ctx)
        except click.ClickException as e:
            pytest.fail(f"{page}: `{line}` does not parse: {e.format_message()}")


def test_docker_builds_name_the_repositorys_dockerfiles():
    builds = [line for p in PAGES for line in shell_lines(p) if line.startswith("docker build")]
    assert builds
    for line in builds:
        argv = shlex.split(line)
        assert (ROOT / argv[argv.index("-f") + 1]).is_file(), line
        assert argv[-1] == "."  # built from the repository root, as the Dockerfiles expect
