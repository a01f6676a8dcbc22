"""The host this process runs on: the RAM it may use, read the way a container sees it.

Standard library only, so the planner (the CPU pseudo-device's memory) and rayquant's inventory
probe (each node's host RAM) read it with the same rule.
"""

from __future__ import annotations

import os
from typing import Iterable

# Where a container's memory limit is: cgroup v2's single hierarchy, then cgroup v1's memory
# controller (the kernel's Documentation/admin-guide/cgroup-v2.rst and cgroup-v1/memory.rst).
CGROUP_MEMORY_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
# cgroup v1 reports "no limit" as a huge page-aligned number (LONG_MAX rounded down to a page);
# anything past 2**60 is that, not a real limit.
_NO_LIMIT_V1 = 2**60


def cgroup_memory_limit_bytes(paths: Iterable[str] = CGROUP_MEMORY_LIMIT_FILES) -> int | None:
    """The container's memory limit from the first readable of `paths`; None when unlimited
    ("max", or v1's huge number) or not in a cgroup."""
    for path in paths:
        try:
            with open(path, encoding="ascii") as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw != "max" and raw.isdigit() and int(raw) < _NO_LIMIT_V1:
            return int(raw)
    return None


def physical_memory_bytes() -> int | None:
    """The machine's RAM (sysconf); None on platforms without these sysconf names."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def host_memory_bytes(cgroup_files: Iterable[str] = CGROUP_MEMORY_LIMIT_FILES,
                      default: int = 16 * 1024**3) -> int:
    """RAM this process may use: physical memory capped by a container limit (KubeRay pods);
    `default` (a laptop's 16 GiB) where neither can be read."""
    physical = physical_memory_bytes()
    limit = cgroup_memory_limit_bytes(cgroup_files)
    known = [m for m in (physical, limit) if m]
    return min(known) if known else default
