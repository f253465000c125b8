"""A process and its descendants, and what /proc/PID/status says of each (Linux)."""

from __future__ import annotations

from pathlib import Path


def tree(pid: int) -> list[int]:
    """`pid` and every process below it, as /proc lists their children now."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                queue += [int(c) for c in children.read_text().split()]
            except OSError:  # it exited meanwhile
                pass
    return found


def status_bytes(pid: int, field: str) -> int:
    """A memory field of /proc/PID/status (VmRSS, VmHWM, …) in bytes; 0 for a process gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
