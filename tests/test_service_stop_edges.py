"""Stop signals at the two edges of a run, where the loop cannot answer them: while a rank waits in
``init_process_group`` for ranks that may never come (the main thread is blocked in C++: the
signal was ignored until torchrun's SIGKILL 30 s later), and after the ``finished`` line, while
the process exits (the default handler was back: a finished run died of the signal)."""
from __future__ import annotations

import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from tests.procs import cmdline, descendants
from tests.service_proc import TORCHRUN_2, Service, free_port

pytestmark = pytest.mark.slow
WAITING = "stopped (SIGTERM) while waiting for the other ranks to join; nothing to save"
# Rank 1 alone gets $RANK1_FLAGS, once the file $GO exists; exec: torchrun's signals reach the
# service itself, as without a wrapper.
WRAPPER = """#!/bin/sh
if [ "$RANK" = 1 ]; then
    while [ ! -e "$GO" ]; do sleep 0.1; done
    exec {python} -m service "$@" $RANK1_FLAGS
fi
exec {python} -m service "$@"
"""


def test_a_rank_whose_peer_failed_first_stops_at_torchruns_sigterm(sample_shards: Path, tmp_path: Path) -> None:
    """Rank 1 cannot write its --out (exit 5) and never joins; torchrun SIGTERMs rank 0, which
    waits in the rendezvous: it ends at once with its line, and torchrun with it.  Rank 1 starts
    once rank 0's stop handler is in (before, the signal's default would end rank 0: no line)."""
    wrapper, go = tmp_path / "wrapper.sh", tmp_path / "go"
    wrapper.write_text(WRAPPER.format(python=sys.executable))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    job = Service(sample_shards, tmp_path / "run", "--epochs", "1", launcher=(*TORCHRUN_2, "--no-python"),
                  program=(str(wrapper),), env={"RANK1_FLAGS": "--out /proc/no-run-here", "GO": str(go)})
    try:
        _wait_until_catching(_rank0(job.proc.pid), signal.SIGTERM)
        go.touch()
        deadline = time.monotonic() + 120
        while "cannot be written" not in job.stderr and job.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        failed = time.monotonic()
        rc = job.wait(timeout=25)  # torchrun's SIGKILL comes 30 s after its SIGTERM
        took = time.monotonic() - failed
    finally:
        job.kill()
    assert rc == 1 and took < 10, (took, job.stderr[-3000:])  # torchrun's: rank 1 failed
    lines = [line for line in job.errors if line.startswith("service:")]
    assert f"service: rank 0: {WAITING}" in lines, job.stderr[-3000:]
    assert any("/proc/no-run-here cannot be written" in line for line in lines), lines


def test_a_stop_while_waiting_for_ranks_that_never_come_ends_at_once(sample_shards: Path, tmp_path: Path) -> None:
    """``docker stop`` of a node whose peers never came: rank 0 of 2, started as torchrun starts
    it (env://), alone; SIGTERM ends it within seconds, exit 0 (nothing to save), one line."""
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    rank0 = Service(sample_shards, tmp_path / "run", "--epochs", "1", env=env)
    try:
        _wait_until_listening(int(env["MASTER_PORT"]))  # in init_process_group, waiting for rank 1
        assert rank0.proc.poll() is None, rank0.stderr
        rank0.signal(signal.SIGTERM)
        sent = time.monotonic()
        rc = rank0.wait(timeout=20)
        took = time.monotonic() - sent
    finally:
        rank0.kill()
    assert rc == 0 and took < 5, (rc, took, rank0.stderr)
    assert [line for line in rank0.errors if line.startswith("service:")] == [f"service: rank 0: {WAITING}"]
    assert "Traceback" not in rank0.stderr


def test_a_sigterm_after_the_finished_line_leaves_exit_code_0(sample_shards: Path, tmp_path: Path) -> None:
    """SIGTERM right after ``finished``, and again at the moment the stop handler is gone (its
    SigCgt bit in /proc/PID/status clears: the process still has its teardown ahead): exit 0."""
    service = Service(sample_shards, tmp_path / "run", "--epochs", "1")
    pid, sent = service.proc.pid, []
    try:
        service.wait_for(r"^finished: ")
        service.signal(signal.SIGTERM)  # the handler is still in: a request nothing reads any more
        while service.proc.poll() is None and not sent:
            masks = _masks(pid)
            if masks and not masks["SigCgt"] >> (signal.SIGTERM - 1) & 1:
                service.signal(signal.SIGTERM)
                sent.append(masks)
            time.sleep(0.002)
        rc = service.wait(timeout=60)
    finally:
        service.kill()
    assert sent, "the process exited before its stop handler was seen gone"
    assert rc == 0, (rc, sent, service.stderr[-2000:])  # was -15: the default action was back
    assert sent[0]["SigIgn"] >> (signal.SIGTERM - 1) & 1, sent  # ignored


def _rank0(torchrun: int, timeout: float = 60) -> int:
    """The pid of the job's one service process (rank 0: rank 1's wrapper waits for ``GO``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [pid for pid in descendants(torchrun) if " -m service " in cmdline(pid)]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError("torchrun did not start rank 0")


def _masks(pid: int) -> dict[str, int]:
    """SigIgn and SigCgt of /proc/PID/status as ints (empty once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return {key: int(fields[key].strip(), 16) for key in ("SigIgn", "SigCgt") if key in fields}


def _wait_until_listening(port: int, timeout: float = 120) -> None:
    """Until a socket of this machine listens on ``port`` (``/proc/net/tcp``: nothing connects to
    it).  A rank 0 joining by ``env://`` serves the job's store there from inside
    ``init_process_group``, where it then waits for the others.  (The wait was a fixed 3 s once its
    stop handler was in, which is at once since ``catch_early``: the service's imports alone take
    3 s on an idle 2-core machine, so on a busier one the SIGTERM came during them and the stop
    took their rest, past the 5 s asserted.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            rows = [line.split() for line in Path(table).read_text().splitlines()[1:]]
            if any(int(row[1].rsplit(":", 1)[1], 16) == port and row[3] == "0A" for row in rows):  # 0A: LISTEN
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


def _wait_until_catching(pid: int, sig: int, timeout: float = 60) -> None:
    """Until ``pid`` handles ``sig`` (its stop handler is in: the service's imports are done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        masks = _masks(pid)
        if masks.get("SigCgt", 0) >> (sig - 1) & 1:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not install its {signal.Signals(sig).name} handler")


def _wait_importing_torch(pid: int, timeout: float = 60) -> None:
    """Until ``pid`` has torch's library mapped: its imports are under way (seconds), before any
    stop handler of the service's own could be in."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text():
                return
        except OSError:
            pass
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not load torch")


def test_a_stop_during_the_imports_ends_the_start_with_one_line(sample_shards: Path, tmp_path: Path) -> None:
    """SIGTERM while ``python -m service`` imports torch: the signal's default action killed it
    (exit -15, no line; a failed rank to torchrun).  Now it is remembered and honoured once the
    stop handler is in: nothing to save, exit 0, one line."""
    service = Service(sample_shards, tmp_path / "run", "--epochs", "1")
    try:
        _wait_importing_torch(service.proc.pid)
        service.signal(signal.SIGTERM)
        rc = service.wait(timeout=60)
    finally:
        service.kill()
    assert rc == 0, (rc, service.stderr)
    assert service.stderr.strip().splitlines() == ["service: stopped (SIGTERM) while starting; nothing to save"]
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_a_stop_of_a_fresh_start_says_to_resume_without_fresh(sample_shards: Path, tmp_path: Path) -> None:
    """After ``--fresh true`` the stop line said 'run the same command again to resume', and that
    command deletes the checkpoint it had just written (make demo TRAIN_ARGS="--fresh true" too)."""
    service = Service(sample_shards, tmp_path / "run", "--epochs", "2", "--fresh", "true")
    assert service.stop_at(r"epoch 1 step 2/") == 0, service.stderr
    (line,) = [ln for ln in (service.stdout + service.stderr).splitlines() if ln.startswith("stopped (SIGTERM)")]
    assert line.endswith("run the same command without --fresh true to resume (with it, a start deletes this "
                         "checkpoint)"), line
