"""The sharder as a real process for the signal tests: its own session, some functions slowed.

``python -m tests.shards_proc [--slow MOD:ATTR=SECONDS]... [--pids MOD:ATTR=FILE]... -- ARGS``
runs ``python -m shards ARGS`` with each ``--slow`` function sleeping before every call (its
first call prints ``slow: MOD:ATTR``, the phase marker a test waits for) and each ``--pids``
function appending the calling process's id to FILE.  A wrapped function keeps its module and
qualified name, so worker tasks still pickle by reference (the forked workers inherit the patch).
"""
from __future__ import annotations

import functools
import importlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.procs import processes

ROOT = Path(__file__).resolve().parents[1]


def _patch(target: str, wrap: Callable[[Callable], Callable]) -> None:
    module_name, attr = target.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, name, functools.wraps(getattr(owner, name))(wrap(getattr(owner, name))))


def _slow(target: str, seconds: float) -> Callable[[Callable], Callable]:
    announced = []

    def wrap(fn: Callable) -> Callable:
        def slowed(*args, **kwargs):
            if not announced:
                announced.append(True)
                print(f"slow: {target}", flush=True)
            time.sleep(seconds)
            return fn(*args, **kwargs)
        return slowed
    return wrap


def _pids(path: str) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable) -> Callable:
        def recorded(*args, **kwargs):
            with open(path, "a") as f:
                f.write(f"{os.getpid()}\n")
            return fn(*args, **kwargs)
        return recorded
    return wrap


def _main(argv: list[str]) -> int:
    split = argv.index("--")
    options, args = argv[:split], argv[split + 1:]
    for flag, spec in zip(options[::2], options[1::2]):
        target, value = spec.split("=")
        _patch(target, _slow(target, float(value)) if flag == "--slow" else _pids(value))
    from shards.__main__ import main
    return main(args)


STARTED: list[Sharder] = []


class Sharder:
    """``python -m tests.shards_proc`` as the leader of a new session; its output collected by threads.

    Every one started is remembered in ``STARTED``; the ``no_stray_sharders`` fixture kills what
    is left of them after each test, so a failing test (a hang is what these tests look for)
    never leaves processes behind."""

    def __init__(self, src: Path, out: Path, *args: str, patches: tuple[str, ...] = ()) -> None:
        STARTED.append(self)
        cmd = [sys.executable, "-m", "tests.shards_proc", *patches, "--", "--src", str(src), "--out", str(out), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s, sink), daemon=True)
                         for s, sink in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, sink: list[str]) -> None:
        for line in stream:
            sink.extend(part for part in line.rstrip("\n").split("\r") if part.strip())

    def wait_for(self, pattern: str, timeout: float = 60) -> None:
        """Until a stdout line matches ``pattern`` (regex)."""
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in list(self.lines)):
            assert self.proc.poll() is None, f"ended before {pattern!r}:\n" + "\n".join(self.lines + self.errors)
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n" + "\n".join(self.lines)
            time.sleep(0.01)

    def signal(self, sig: int, group: bool) -> None:
        """``sig`` to the sharder alone, or to its whole process group (``kill -- -PGID``)."""
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    def workers(self) -> list[int]:
        """Process ids of the sharder's children."""
        return [pid for pid, parent in processes().items() if parent[0] == self.proc.pid]

    def kill(self) -> None:
        """SIGKILL the sharder and everything left in its session."""
        for pid in ([self.proc.pid] if self.proc.poll() is None else []) + self.strays():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def strays(self) -> list[int]:
        """Processes still in the sharder's session (its workers, when they outlive it)."""
        return [pid for pid, (_, session) in processes().items() if session == self.proc.pid]


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
