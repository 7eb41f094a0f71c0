"""Stop requests as real signals: a burst landing while the main thread is inside the stop flag's
own code (no deadlock), and a closed terminal (SIGHUP through a real pseudo-terminal) stopping the
service with a checkpoint like SIGTERM does."""
from __future__ import annotations

import fcntl
import os
import re
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.service_proc import ROOT, TINY, checkpoint_steps, events

# A process that requests stops from code in a tight loop (the main thread is inside
# StopFlag.request most of the time) while another thread sends it SIGTERM, round after round.
# The handler ran when SIGTERM is back to its default action.
BURST = r"""
import os, random, signal, sys, threading
from service.signals import StopFlag

for i in range(int(sys.argv[1])):
    flag = StopFlag().install()
    threading.Timer(random.uniform(0, 0.002), os.kill, (os.getpid(), signal.SIGTERM)).start()
    while signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        flag.request("a stop on another rank")
    assert flag.requested and flag.signal_name == "SIGTERM", (i, flag.signal_name)
print("handled", i + 1)
"""


def test_signals_landing_inside_the_stop_flag_never_deadlock() -> None:
    """The handler runs in the main thread between two bytecodes; had it to take a lock the
    interrupted code holds (``threading.Event.set``), it would wait for itself forever."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run([sys.executable, "-c", BURST, "200"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the process hung: a signal handler deadlocked against the code it interrupted")
    assert done.returncode == 0 and done.stdout.strip() == "handled 200", done.stderr


def _read_until(fd: int, pattern: str, timeout: float = 240) -> str:
    """Read the terminal's output until ``pattern`` appears."""
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                seen += os.read(fd, 65536).decode(errors="replace")
            except OSError:
                break
            if re.search(pattern, seen):
                return seen
    raise AssertionError(f"no {pattern!r} on the terminal; it showed:\n{seen}")


@pytest.mark.slow
def test_a_closed_terminal_stops_with_a_checkpoint(sample_shards: Path, tmp_path: Path) -> None:
    """The service runs on a pseudo-terminal as its controlling terminal (``make demo`` in an ssh
    session); the terminal closes: the kernel hangs up the session, sends SIGHUP, and every later
    write to the terminal fails.  The run must stop like on SIGTERM: a checkpoint, exit 0, and
    the stop line where it can still be read (stderr here)."""
    out = tmp_path / "run"
    master, slave = os.openpty()

    def controlling_terminal() -> None:  # in the child: a new session whose terminal is the pty
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    cmd = [sys.executable, "-m", "service", "--shards", str(sample_shards), "--out", str(out), *TINY,
           "--epochs", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=slave, stdout=slave,
                            stderr=subprocess.PIPE, text=True, preexec_fn=controlling_terminal)
    os.close(slave)
    try:
        _read_until(master, r"epoch 1 step 2/6")
        os.close(master)  # the terminal is gone
        stderr = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    stopped = events(out, "stopped")
    assert len(stopped) == 1 and stopped[0]["reason"] == "SIGHUP"
    assert checkpoint_steps(out) == [stopped[0]["step"]] and 2 <= stopped[0]["step"] < 6
    assert f"stopped (SIGHUP) at step {stopped[0]['step']}" in stderr and "Traceback" not in stderr
