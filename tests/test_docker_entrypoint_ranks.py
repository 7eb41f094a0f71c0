"""docker/entrypoint.sh's stop with several ranks (NPROC=2), torchrun replaced by a small script that
starts ranks as torchrun does: the stop signal goes to torchrun's ranks, not to torchrun (whose
SignalException is exit 1, a data error to the container), including a rank started just after
the signal and one still importing; before torchrun started any rank, exit 0 with one line.
(One process and the launcher's choice: ``tests/test_docker_entrypoint.py``.)"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_docker_entrypoint import NOTHING_TO_SAVE, entrypoint, kill_left, launches, wait_ready


# torchrun as far as signals go: ranks in sessions of their own (as torchrun starts them) that stop
# on a signal with exit 0 once their handler is in (a delay first: a rank still starting, which the
# signal's default action kills); a signal to torchrun itself is its SignalException, exit 1.
RANK = """import os, signal, sys, time
runs = os.environ["RUNS"]
open(runs + ".pid" + sys.argv[1], "w").write(str(os.getpid()))
time.sleep(float(sys.argv[2]))
def stop(signum, frame):
    with open(runs + ".signals", "a") as f:
        f.write(f"rank{sys.argv[1]} {signal.Signals(signum).name}\\n")
    sys.exit(0)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, stop)
with open(runs + ".ready" + sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
while True:
    time.sleep(0.1)
"""
TORCHRUN_START = f"""#!{sys.executable}
import os, signal, subprocess, sys, time
runs = os.environ["RUNS"]
def caught(signum, frame):
    with open(runs + ".signals", "a") as f:
        f.write(f"torchrun {{signal.Signals(signum).name}}\\n")
    print(f"torch.distributed.elastic.multiprocessing.api.SignalException: Process {{os.getpid()}} got signal: {{signum}}",
          file=sys.stderr)
    sys.exit(1)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, caught)
open(runs, "a").write("x\\n")
open(runs + ".torchrun", "w").write(str(os.getpid()))
def rank(r, delay=0):
    return subprocess.Popen([sys.executable, "-c", {RANK!r}, str(r), str(delay)], start_new_session=True)
def finish(ranks):  # torchrun exits 1 when a rank failed
    sys.exit(1 if any([r.wait() for r in ranks]) else 0)
"""
TORCHRUN = TORCHRUN_START + "finish([rank(0), rank(1)])\n"
IN_RENDEZVOUS = TORCHRUN_START + "while True:  # waiting for the other nodes\n    time.sleep(0.1)\n"
LATE_RANK = TORCHRUN_START + """ranks = [rank(0)]
while not os.path.exists(runs + ".spawn1"):  # the test says when
    time.sleep(0.05)
finish(ranks + [rank(1)])
"""
SLOW_RANK = TORCHRUN_START + "finish([rank(0), rank(1, delay=2)])\n"
STAND_INS = ("runs.torchrun", "runs.pid0", "runs.pid1")


def stop_torchrun(tmp_path: Path, stand_in: str, sig: signal.Signals, *ready: str, then=None, **env: str):
    """The entrypoint with torchrun as ``stand_in``, ``sig`` sent once ``ready`` files are written,
    ``then()`` after; returns its exit code (None: still running 10 s later) and its stderr."""
    proc = entrypoint(tmp_path, popen=True, torchrun=stand_in, **{"NPROC": "2", **env})
    try:
        wait_ready(tmp_path, *ready)
        proc.send_signal(sig)
        if then:
            then()
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
    finally:
        proc.kill()
        kill_left(tmp_path, *STAND_INS)
    return code, proc.communicate()[1]


def told(tmp_path: Path) -> list[str]:
    signals = tmp_path / "runs.signals"
    return sorted(signals.read_text().splitlines()) if signals.exists() else []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_goes_to_torchruns_ranks_not_to_torchrun(sig: signal.Signals, tmp_path: Path) -> None:
    """make stop with NPROC=2: passed to torchrun, the signal made it exit 1 with a traceback
    (the container's exit 1, which means a data error) and SIGKILL its ranks 30 s later,
    mid-checkpoint on a slow disk."""
    code, _ = stop_torchrun(tmp_path, TORCHRUN, sig, "runs.ready0", "runs.ready1")
    assert code == 0 and told(tmp_path) == [f"rank0 {sig.name}", f"rank1 {sig.name}"] and launches(tmp_path) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_before_torchrun_started_its_ranks_exits_0_with_one_line(sig: signal.Signals, tmp_path: Path) -> None:
    """docker stop while this node waits in the rendezvous for the others (minutes, maybe), or just
    after the start: torchrun itself got the signal, a SignalException traceback, exit 1."""
    code, err = stop_torchrun(tmp_path, IN_RENDEZVOUS, sig, "runs.torchrun",
                              NNODES="2", NODE_RANK="1", RDZV_ENDPOINT="host0:29400")
    assert code == 0 and err.splitlines() == [NOTHING_TO_SAVE]
    assert told(tmp_path) == [] and launches(tmp_path) == 1


def test_a_rank_started_after_the_stop_signal_is_told_too(tmp_path: Path) -> None:
    """A rank torchrun started just after the entrypoint looked for them was never told, and
    torchrun waited on it until Docker's SIGKILL."""
    def start_rank1() -> None:
        wait_ready(tmp_path, "runs.signals")  # rank 0 was told
        (tmp_path / "runs.spawn1").touch()
    code, _ = stop_torchrun(tmp_path, LATE_RANK, signal.SIGTERM, "runs.ready0", then=start_rank1)
    assert code == 0 and told(tmp_path) == ["rank0 SIGTERM", "rank1 SIGTERM"]


def test_a_rank_still_starting_is_told_once_its_handler_is_in(tmp_path: Path) -> None:
    """A rank signalled before the service installs its handler (its imports take seconds) died of
    the signal: torchrun saw a failed rank and exited 1."""
    code, _ = stop_torchrun(tmp_path, SLOW_RANK, signal.SIGTERM, "runs.ready0", "runs.pid1")
    assert code == 0 and told(tmp_path) == ["rank0 SIGTERM", "rank1 SIGTERM"]
