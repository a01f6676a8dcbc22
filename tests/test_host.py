"""planner.host: the RAM a process may use, container limit included (fake cgroup files)."""

from __future__ import annotations

from planner.host import cgroup_memory_limit_bytes, host_memory_bytes, physical_memory_bytes


def _file(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="ascii")
    return str(path)


def test_cgroup_limit_v2_then_v1_and_no_limit(tmp_path):
    v2 = _file(tmp_path, "memory.max", "8589934592\n")
    v1 = _file(tmp_path, "memory.limit_in_bytes", "4294967296\n")
    missing = str(tmp_path / "absent")
    assert cgroup_memory_limit_bytes([v2, v1]) == 8 * 2**30  # the first readable file wins
    assert cgroup_memory_limit_bytes([missing, v1]) == 4 * 2**30
    assert cgroup_memory_limit_bytes([_file(tmp_path, "v2max", "max\n")]) is None
    # cgroup v1 says "no limit" with a huge page-aligned number.
    assert cgroup_memory_limit_bytes([_file(tmp_path, "v1huge", "9223372036854771712\n")]) is None
    assert cgroup_memory_limit_bytes([missing]) is None


def test_host_memory_is_physical_capped_by_the_container_limit(tmp_path):
    physical = physical_memory_bytes()
    assert physical and physical > 0
    assert host_memory_bytes([str(tmp_path / "absent")]) == physical
    small = _file(tmp_path, "memory.max", f"{2**30}\n")
    assert host_memory_bytes([small]) == min(physical, 2**30) == 2**30
    big = _file(tmp_path, "big", f"{physical * 2}\n")
    assert host_memory_bytes([big]) == physical
