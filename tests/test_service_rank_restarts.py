"""A torchrun job that loses a process (a real ``kill -9``; gloo on the CPU): a rank, which
``torchrun --max-restarts`` starts again, and the ranks must meet anew and resume the newest
checkpoint; or torchrun's agent itself, after which no rank may train on alone."""
from __future__ import annotations

import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from tests.procs import alive, cmdline, descendants, kill_all
from tests.service_proc import TORCHRUN_2, Service, checkpoint_steps, events, free_port

pytestmark = pytest.mark.slow
# The restarted rank 1 comes $LATE seconds after rank 0, as one whose imports are slower (a busy
# node, a cold disk) does.
LATE_RANK_1 = """#!/bin/sh
if [ "$RANK" = 1 ] && [ "$TORCHELASTIC_RESTART_COUNT" = 1 ]; then sleep "$LATE"; fi
exec {python} -m service "$@"
"""


def rank_pid(launcher: int, rank: int, timeout: float = 60) -> int:
    """The pid of the service process of ``rank`` below ``launcher`` (read from its environment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants(launcher):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and "-m service" in cmdline(pid):
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} below {launcher}")


def test_a_rank_killed_mid_run_is_restarted_by_torchrun_and_resumes(sample_shards: Path, tmp_path: Path) -> None:
    """kill -9 of rank 1 after the first checkpoint; torchrun --max-restarts 1 starts both ranks
    again, rank 1 late.  They meet, resume that checkpoint and finish, exit 0 (rank 0 used to
    read rank 1's dead address, left in torchrun's store by the killed attempt, and die in
    ``init_process_group``: a gloo traceback on every restart)."""
    wrapper, out = tmp_path / "wrapper.sh", tmp_path / "run"
    wrapper.write_text(LATE_RANK_1.format(python=sys.executable))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    job = Service(sample_shards, out, "--epochs", "2", "--checkpoint.every_steps", "1", "--http.port",
                  str(free_port(2)), launcher=(*TORCHRUN_2, "--max-restarts", "1", "--no-python"),
                  program=(str(wrapper),), env={"LATE": "8"})
    try:
        job.wait_for(r"^checkpoint .*checkpoint-000000001\.pt")
        os.kill(rank_pid(job.proc.pid, 1), signal.SIGKILL)
        rc = job.wait(timeout=300)
    finally:
        job.kill()
    assert "connectFullMesh" not in job.stderr, job.stderr[-3000:]
    assert rc == 0, job.stderr[-3000:]
    assert "resuming run" in job.stdout, job.stdout
    # Rank 1 ended without a word: every rank's restart knows, and checks the shards first (here all
    # checked by the first attempt already: service.unclean_end).
    assert f"rank 1's last start in {out} (pid " in job.stderr, job.stderr[-3000:]
    assert [e["ranks"] for r in (0, 1) for e in events(out, "unclean_end", r)] == [[1], [1]]
    finished = events(out, "finished")
    assert len(finished) == 1 and finished[0]["step"] == 6, finished


def test_ranks_whose_torchrun_was_killed_stop_with_one_checkpoint(sample_shards: Path, tmp_path: Path) -> None:
    """kill -9 of torchrun's agent mid-run: its ranks, in sessions of their own, trained on as
    orphans (holding the run directory's locks).  They now stop as for a SIGTERM to torchrun:
    at one step, with one checkpoint, exit 0."""
    out = tmp_path / "run"
    job = Service(sample_shards, out, "--epochs", "3", "--http.port", str(free_port(2)), launcher=TORCHRUN_2)
    ranks: list[int] = []
    try:
        job.wait_for(r"epoch 1 step 2/3")
        ranks = [rank_pid(job.proc.pid, rank) for rank in (0, 1)]
        job.proc.kill()
        deadline = time.monotonic() + 60
        while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in ranks if alive(pid)]
    finally:
        for pid in ranks:
            kill_all_pid(pid)
        kill_all(job.proc)
    assert not left, f"ranks {left} trained on after torchrun was killed\n{job.stdout[-2000:]}"
    stopped = [events(out, "stopped", rank) for rank in (0, 1)]
    assert all(len(s) == 1 and s[0]["reason"] == "SIGTERM" for s in stopped), job.stdout[-2000:] + job.stderr[-2000:]
    step = stopped[0][0]["step"]
    assert stopped[1][0]["step"] == step and checkpoint_steps(out)[-1] == step


def kill_all_pid(pid: int) -> None:
    """SIGKILL a process that is no child of the test's (an orphaned rank), if it is still there."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
