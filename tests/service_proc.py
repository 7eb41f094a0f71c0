"""Helpers for the service tests: start ``python -m service`` as a real process, follow its output,
signal it, and read what it wrote.  Tiny runs: batch 24 over the 144 training images of the
``sample_shards`` fixture is 6 steps per epoch, 1-view evaluation, a log line per step."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.procs import kill_all

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--loader.batch_size", "24", "--loader.threads", "2", "--log_every", "1", "--eval_views", "1",
        "--model.bias_init", "0.1", "--http.host", "127.0.0.1", "--http.port", "0")
STEPS_PER_EPOCH = 6
# Two ranks on this machine through torchrun (gloo on the CPU); its agent forwards SIGTERM to them.
TORCHRUN_2 = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


class Service:
    """One service process; its stdout and stderr are collected by threads as they arrive."""

    def __init__(self, shards: Path, out: Path, *args: str, env: dict[str, str] | None = None,
                 launcher: tuple[str, ...] = (), group: bool = False, program: tuple[str, ...] = ("-m", "service")
                 ) -> None:
        """``group``: in a process group of its own (a terminal's job), for :meth:`signal_group`.
        ``program``: what the launcher starts (torchrun ``--no-python`` and a wrapper script)."""
        cmd = [sys.executable, *launcher, *program, "--shards", str(shards), "--out", str(out), *TINY, *args]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1, start_new_session=group)
        self.group = group
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s, sink), daemon=True)
                         for s, sink in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors))]
        for r in self._readers:
            r.start()

    @staticmethod
    def _read(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    @property
    def stdout(self) -> str:
        return "\n".join(self.lines)

    @property
    def stderr(self) -> str:
        return "\n".join(self.errors)

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        """The first stdout line matching ``pattern`` (regex), waiting for it to be printed."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                seen += 1
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None and seen == len(self.lines):
                time.sleep(0.2)  # let the reader threads drain the pipes
                if seen == len(self.lines):
                    break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}; rc={self.proc.poll()}\n"
                             f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}")

    def url(self) -> str:
        """The base URL the service printed at start (``http://127.0.0.1:PORT``)."""
        return self.wait_for(r"metrics: (http://[^/]+)/metrics").group(1)

    def signal_group(self, sig: int = signal.SIGTERM) -> None:
        """``sig`` to every process of the group (started with ``group=True``): the launcher and
        its ranks at once, as a closed terminal or a service manager stopping a unit does."""
        os.killpg(self.proc.pid, sig)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        for r in self._readers:
            r.join(timeout=10)
        return rc

    def stop_at(self, pattern: str, group: bool = False, timeout: float = 120) -> int:
        """SIGTERM (to the process group with ``group``) once a stdout line matches ``pattern``;
        the exit code.  Killed whatever happens, as ``kill`` does."""
        try:
            self.wait_for(pattern)
            (self.signal_group if group else self.signal)(signal.SIGTERM)
            return self.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        kill_all(self.proc)  # first: once the launcher is gone, what it started is no longer below it
        if self.group:  # the rest of its group, should the launcher have gone first
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_service(shards: Path, out: Path, *args: str, timeout: float = 300,
                launcher: tuple[str, ...] = ()) -> tuple[int, Service]:
    """Run to the end; (exit code, the finished Service)."""
    service = Service(shards, out, *args, launcher=launcher)
    try:
        return service.wait(timeout), service
    finally:
        service.kill()


def events(out: Path, kind: str | None = None, rank: int = 0) -> list[dict]:
    """The JSON log's records (of one ``event`` kind) of one rank."""
    path = out / ("log.jsonl" if rank == 0 else f"log.rank{rank}.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in records if kind is None or r["event"] == kind]


def checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in out.glob("checkpoint-*.pt"))


def free_port(count: int = 1) -> int:
    """A free port on 127.0.0.1, and the ``count - 1`` ports after it free too (torchrun's ranks
    serve their metrics on the base port + their local rank).

    Drawn below the kernel's ephemeral range: a port from there (``bind(0)``'s) was free when
    chosen but taken by an outgoing connection (gloo's store, another run's scrape) during the
    seconds a service takes to start, and a rank exited 3 ("port ... already in use")."""
    low = max(_ephemeral_low(), 1024 + 1000)  # a range reaching down to 1024 still leaves some
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(max(low - 12000, 1024), low - count)
        if all(_bindable(port) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} free ports in a row on 127.0.0.1 below {low}")


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections (Linux's default: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
