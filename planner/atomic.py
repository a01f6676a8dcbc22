"""Atomic outputs: a crash leaves the old file or the new one, never half of one.

Standard library only, so the planner and rayquant share it. Files and directories get the
permissions the user's umask gives any new file (temporary files are created private, 0600/0700,
which would leave plans, manifests and adapters unreadable to the rest of a team).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from planner.vocab import SettingError


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


def publish_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Put the finished directory `tmp` (beside `dest`, on the same file system) at `dest` with the
    umask's permissions. An existing `dest` (the caller checked it is empty or a previous output of
    ours) is renamed aside first and removed only once the new one is in place."""
    import shutil

    tmp, dest = Path(tmp), Path(dest)
    publish_mode(tmp)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


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


# -- never replace what rayquant did not write -----------------------------------------------------

# Every file rayquant writes carries one of these near its start (a JSON key, a YAML comment, PNG/SVG
# metadata), so a later run can tell its own outputs from the user's files.
SIGNATURE = "written by rayquant"
WRITTEN_BY = {"written_by": "rayquant"}  # the JSON form: a plan's or inventory's first key
_MARKERS = (SIGNATURE.encode(), b'"written_by": "rayquant"', b"written_by: rayquant")
_HEAD_BYTES = 8192


class OutputExistsError(SettingError):
    """An output path already holds something rayquant may not replace (a user's file or folder,
    or a previous output without `overwrite`)."""

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        self.path = Path(path)
        super().__init__(message)


def has_signature(path: str | os.PathLike) -> bool:
    """True for a file whose first few KiB carry SIGNATURE (an output of rayquant's)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError:
        return False
    return any(m in head for m in _MARKERS)


def _listing(path: Path, limit: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_output(path: str | os.PathLike, *, overwrite: bool, what: str, directory: bool = False,
                 ours=has_signature) -> None:
    """Refuse an output path that holds something rayquant must not replace, before any work.

    A path that does not exist (or an empty directory, for a directory output) is free. One that
    holds a previous rayquant output (`ours(path)`) is replaced only with `overwrite`; anything else
    (a user's file or folder) is never replaced. Raises OutputExistsError saying which and the fix.
    """
    path = Path(path).expanduser()
    if not path.exists() and not path.is_symlink():
        return
    if directory:
        if not path.is_dir():
            raise OutputExistsError(path, f"{path} is a file, not a directory, so it cannot hold the "
                                          f"{what}. To fix: choose a new or empty directory")
        if not any(path.iterdir()):
            return
    elif path.is_dir():
        raise OutputExistsError(path, f"{path} is a directory; the {what} is a file. To fix: name a "
                                      f"file, e.g. {path / ('out' + (path.suffix or '.json'))}")
    if not ours(path):
        held = f" (it holds {_listing(path)})" if path.is_dir() else ""
        raise OutputExistsError(path, f"{path} already exists and was not written by rayquant{held}; "
                                      f"rayquant never replaces what it did not write. To fix: "
                                      f"choose a new {'or empty directory' if directory else 'file name'} "
                                      f"for the {what}")
    if not overwrite:
        raise OutputExistsError(path, f"{path} holds a previous {what} written by rayquant. To fix: "
                                      f"add {{overwrite}} to replace "
                                      f"it atomically, or choose another path")
