"""The tests' view of the live processes, from /proc: who runs below whom, in which session, with
which command line, and killing a process with everything below it.  Zombies count as ended (a
container without an init reaps nobody's)."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def _stat(path: Path) -> list[str] | None:
    """The fields after the command name of a /proc/PID/stat (state, parent, group, session, ...),
    or None when the process is gone or a zombie."""
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields


def processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every live process."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        if (fields := _stat(stat)) is not None:
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[3]))
    return table


def alive(pid: int) -> bool:
    return _stat(Path(f"/proc/{pid}/stat")) is not None


def cmdline(pid: int) -> str:
    """The command line, its arguments joined by spaces ("" when the process is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    return [pid for pid in processes() if text in cmdline(pid)]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, children first."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in processes().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(0), [])
        found += below
        todo += below
    return found


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and everything below it, then reap it.  Its process group is not enough:
    torchrun starts each rank in a session of its own, and a rank left behind by a failed test
    (stuck in gloo, or training on) would load the machine under the tests after it."""
    if proc.poll() is None:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()
