"""Atomic outputs: a crash leaves the old file or the new one, never half of one.

Standard library only, so the planner and rayquant share it. Files and directories get the
permissions the user's umask gives any new file (temporary files are created private, 0600/0700,
which would leave plans, manifests and adapters unreadable to the rest of a team).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike) -> None:
    """Give a file or directory (and what a directory holds) the umask's default permissions."""
    mask = _umask()
    path = Path(path)
    if path.is_dir():
        for item in [path, *path.rglob("*")]:
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def write_atomically(path: str | os.PathLike, data: str | bytes | None = None, *, write=None) -> Path:
    """Write `data` (text or bytes), or call `write(tmp_path)`, into a temporary file beside `path`,
    then rename it over `path`. Parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if data is not None:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        if write is not None:
            write(tmp)
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
