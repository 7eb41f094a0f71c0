"""Stop requests as real signals: a burst landing while the main thread is inside the stop flag's
own code (no deadlock), and a closed terminal (SIGHUP through a real pseudo-terminal) stopping the
service with a checkpoint like SIGTERM does."""
from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.service_proc import ROOT, TINY, Service, checkpoint_steps, events

# A process that requests stops from code in a tight loop (the main thread is inside
# StopFlag.request most of the time) while another thread sends it SIGTERM, round after round.
# The handler ran when the flag names the signal.
BURST = r"""
import os, random, signal, sys, threading
from service.signals import StopFlag

for i in range(int(sys.argv[1])):
    flag = StopFlag().install()
    threading.Timer(random.uniform(0, 0.002), os.kill, (os.getpid(), signal.SIGTERM)).start()
    while flag.signal_name != "SIGTERM":
        flag.request("a stop on another rank")
    assert flag.requested, i
    flag.uninstall()
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
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as a login shell's child has it (make test under nohup: ignored)
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


# The service started by nohup (SIGHUP ignored, then exec'd), through the tests' Service helper.
NOHUP = ("-c", "import os, sys; os.execvp('nohup', ['nohup', sys.executable, *sys.argv[1:]])")


@pytest.mark.slow
def test_under_nohup_a_sighup_leaves_the_run_training(sample_shards: Path, tmp_path: Path) -> None:
    """``nohup python -m service ... &``, then the ssh session closes: the SIGHUP that nohup
    ignores must stay ignored (the run was to outlive the terminal); a SIGTERM still stops it."""
    out = tmp_path / "run"
    service = Service(sample_shards, out, "--epochs", "2", launcher=NOHUP)
    try:
        service.wait_for(r"epoch 1 step 2/6")
        service.signal(signal.SIGHUP)
        service.wait_for(r"epoch 2 step 1/6")  # epoch 1 done and evaluated: the SIGHUP asked for nothing
        service.signal(signal.SIGTERM)
        rc = service.wait(timeout=120)
    finally:
        service.kill()
    assert rc == 0, service.stderr
    stopped = events(out, "stopped")
    assert len(stopped) == 1 and stopped[0]["reason"] == "SIGTERM" and stopped[0]["step"] > 6, service.stdout
    assert "SIGHUP" not in service.stdout + service.stderr and [e["epoch"] for e in events(out, "eval")] == [1]


# A process that, once a stop is requested, works 2 s more in Python (the step and the checkpoint
# a stop waits for) and then exits 0; or (argv[1] == "c") sits in one long C call (a matmul).
STOPPING = r"""
import signal, sys, time
import torch
from service.signals import StopFlag

flag = StopFlag().install()
print("ready", flush=True)
if sys.argv[1] == "c":
    torch.set_num_threads(1)
    a = torch.ones(8192, 8192)
    a @ a  # tens of seconds on one core, in C: the Python-level handler cannot run meanwhile
    print("the C call ended", flush=True)
    sys.exit(0)
while not flag.requested:
    time.sleep(0.01)
print("stopping", flush=True)
end = time.monotonic() + 2
while time.monotonic() < end:
    time.sleep(0.01)
print("stopped with a checkpoint", flush=True)
"""


@pytest.mark.slow
def test_a_stop_during_the_last_epochs_checkpoint_finds_the_run_finished(sample_shards: Path, tmp_path: Path) -> None:
    """Every epoch trained and evaluated: the run is done, whatever the signal says (it said
    "stopped ... run the same command again to resume" and skipped the wait for the background
    shard check that a finished run owes)."""
    service = Service(sample_shards, tmp_path / "run", "--epochs", "1")
    assert service.stop_at(r"epoch 1/1: train loss") == 0, service.stderr  # printed before its checkpoint
    assert "finished: 1 epoch(s)" in service.stdout and "stopped" not in service.stdout, service.stdout
    assert [e["event"] for e in events(tmp_path / "run") if e["event"] in ("finished", "stopped")] == ["finished"]


@pytest.fixture
def stopping():
    """Start STOPPING in a mode; whatever the test does, the process does not outlive it."""
    procs = []

    def start(mode: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", STOPPING, mode], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_same_stop_delivered_twice_still_checkpoints(stopping) -> None:
    """A group SIGTERM reaches the service and its parent, which passes it on (GNU make, torchrun):
    the copy, milliseconds later, must not end the process before its checkpoint."""
    proc = stopping("python")
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().strip() == "stopping"
    proc.send_signal(signal.SIGTERM)  # the forwarded copy
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.strip() == "stopped with a checkpoint", (proc.returncode, err)


def test_a_later_second_signal_ends_the_process_even_inside_a_long_c_call(stopping) -> None:
    proc = stopping("c")
    time.sleep(0.5)  # inside the matmul
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("the second SIGTERM did not end a process inside a long C call")
    assert time.monotonic() - sent < 2 and proc.returncode == 143 and "the C call ended" not in out
    assert "SIGTERM again" in err and "without the checkpoint" in err, err


def test_a_service_run_in_process_gives_the_signal_handlers_back(sample_shards: Path, tmp_path: Path) -> None:
    """Benchmarks and tests run the service in-process.  However the run ends (here it cannot
    start: its port is taken), the caller gets its own handlers back: pytest's Ctrl-C, and a
    SIGHUP that ``nohup`` ignores stays ignored."""
    import socket

    from service.app import parse, run_service
    from service.errors import ServiceError

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        cfg = parse(["--shards", str(sample_shards), "--out", str(tmp_path / "run"), *TINY,
                     "--http.port", str(taken.getsockname()[1])])
        with pytest.raises(ServiceError, match="already in use"):
            run_service(cfg)
        after = {sig: signal.getsignal(sig) for sig in before}
    finally:
        taken.close()
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert after == {**before, signal.SIGHUP: signal.SIG_IGN}
