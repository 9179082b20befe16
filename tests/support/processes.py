"""Processes a test starts and watches: the `fruitpipe` command line, the members of its session, waiting for a
condition, a worker blocked on a FIFO, and a folder's snapshot to show nothing writes on after a kill."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fruitpipe.cli", *args]


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid`: the driver, its JVM, and PySpark's daemons and workers, which leave the
    driver's process group (setpgid) but not its session. Zombies run nothing and are left out."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, _, _, session = stat[stat.rindex(")") + 2:].split()[:4]
            if int(session) == sid and state != "Z":
                members.append(int(entry))
    return members


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and mtime ({} when there is no folder)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def blocked_opening_a_fifo(fifo: Path, timeout_s: float) -> int:
    """The one process below this one with a thread waiting in the kernel for the FIFO's other end.

    `wait_for_partner` in /proc/<pid>/task/<tid>/wchan is where open() of a FIFO sleeps; this test holds the only
    FIFO its own descendants open, so that process is the Python worker running the FIFO's shard.
    """
    import psutil

    def waiting() -> list[int]:
        found = []
        for child in psutil.Process().children(recursive=True):
            try:
                tasks = os.listdir(f"/proc/{child.pid}/task")
                channels = [Path(f"/proc/{child.pid}/task/{tid}/wchan").read_text() for tid in tasks]
            except OSError:
                continue
            if "wait_for_partner" in channels:
                found.append(child.pid)
        return found

    wait_until(lambda: len(waiting()) == 1, timeout_s, f"a worker to block opening {fifo.name}", poll_s=0.2)
    return waiting()[0]
