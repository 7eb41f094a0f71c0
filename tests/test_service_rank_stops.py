"""A stop signal to one rank of a torchrun job (real processes, real signals, gloo on the CPU) while
another rank is slow to come: the whole job must end within seconds, exit 0, one line per rank and
no traceback.  The stopped rank used to exit 0 alone ("nothing to save"); a peer joining after that
waited in ``init_process_group`` for gloo's 30-minute timeout, or died of gloo's "Connection
refused" with a traceback (torchrun's exit 1, which the Docker entrypoint reads as a data error)."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from tests.service_proc import TORCHRUN_2, Service, checkpoint_steps
from tests.test_service_rank_restarts import rank_pid
from tests.test_shard_check_stop import pad_shard
from tests.test_service_stop_edges import WAITING, _wait_importing_torch, _wait_until_catching

pytestmark = pytest.mark.slow
TOLD = "stopped (rank {rank}'s SIGTERM) while waiting for the other ranks to join; nothing to save"
# Rank $LATE_RANK starts once the file $GO exists: a rank whose node or imports are slow.
LATE = """#!/bin/sh
if [ "$RANK" = "$LATE_RANK" ]; then
    while [ ! -e "$GO" ]; do sleep 0.1; done
fi
exec {python} -m service "$@"
"""


def _late_job(shards: Path, tmp_path: Path, nproc: int, late_rank: int, *args: str) -> tuple[Service, Path]:
    """An ``nproc``-rank job whose rank ``late_rank`` waits for the returned file to exist."""
    wrapper, go = tmp_path / "late.sh", tmp_path / "go"
    wrapper.write_text(LATE.format(python=sys.executable))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    launcher = (*TORCHRUN_2[:-1], str(nproc), "--no-python")
    job = Service(shards, tmp_path / "run", "--epochs", "1", *args, launcher=launcher, program=(str(wrapper),),
                  env={"LATE_RANK": str(late_rank), "GO": str(go)})
    return job, go


def _service_lines(job: Service) -> list[str]:
    return [line for line in job.errors if line.startswith("service:")]


@pytest.mark.parametrize(("nproc", "stopped", "late"), [(2, 0, 1), (3, 1, 2)])
def test_a_rank_stopped_while_its_peer_is_late_ends_the_whole_job(sample_shards: Path, tmp_path: Path, nproc: int,
                                                                  stopped: int, late: int) -> None:
    """SIGTERM to rank ``stopped`` while it waits in ``init_process_group`` for rank ``late``,
    which starts only after the stopped rank has gone: every other rank learns of the stop
    (torchrun's store), the late one at its start and one already waiting (rank 0 of 3) while it
    waits, and ends at once too; torchrun exits 0."""
    job, go = _late_job(sample_shards, tmp_path, nproc, late)
    try:
        pids = [rank_pid(job.proc.pid, rank) for rank in range(nproc) if rank != late]
        for pid in pids:
            _wait_until_catching(pid, signal.SIGTERM)
        time.sleep(3)  # into init_process_group, waiting for the late rank
        pid = rank_pid(job.proc.pid, stopped)
        assert job.proc.poll() is None, job.stderr[-3000:]
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while f"rank {stopped}: {WAITING}" not in job.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
        go.touch()
        rc = job.wait(timeout=120)  # was: the late rank waited for gloo's 30-minute timeout (or rc 1)
    finally:
        job.kill()
    assert rc == 0, job.stderr[-3000:]
    assert "Traceback" not in job.stderr, job.stderr[-3000:]
    told = [f"service: rank {rank}: {TOLD.format(rank=stopped)}" for rank in range(nproc) if rank != stopped]
    assert sorted(_service_lines(job)) == sorted([f"service: rank {stopped}: {WAITING}", *told]), job.stderr[-3000:]
    assert not list((tmp_path / "run").glob("checkpoint-*")), "nothing was trained"


def test_a_rank_stopped_during_rank_0s_shard_check_ends_the_check(sample_shards: Path, tmp_path: Path) -> None:
    """``data.verify before``: rank 0 hashes every shard (minutes on ImageNet) while rank 1 waits
    for its verdict.  A SIGTERM to rank 1 alone used to go unseen until the check was done and the
    loaders built (then the loop's first agreement stopped both, with a step-0 checkpoint); now
    rank 0's check ends within a block of its hash, and both ranks end as for a stop during it."""
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    pad_shard(shards)
    job = Service(shards, tmp_path / "run", "--epochs", "1", "--data.verify", "before", "--loader.shuffle_buffer", "16",
                  launcher=TORCHRUN_2)
    try:
        job.wait_for(r"shards: checking 10 shard\(s\), 6\.4 GB, against the manifest before training")
        os.kill(rank_pid(job.proc.pid, 1), signal.SIGTERM)
        rc = job.wait(timeout=120)
    finally:
        job.kill()
    assert rc == 0, job.stderr[-3000:]
    assert "Traceback" not in job.stderr and "train:" not in job.stdout, job.stderr[-3000:]  # no loader built
    lines = _service_lines(job)
    assert len(lines) == 2 and all("during the shard check before training (data.verify before)" in line
                                   for line in lines), lines
    assert "service: stopped (rank 1's SIGTERM) during the shard check" in lines[0] or \
        "service: stopped (rank 1's SIGTERM) during the shard check" in lines[1], lines
    assert checkpoint_steps(tmp_path / "run") == []


def test_a_rank_stopped_during_its_imports_ends_the_job_without_a_traceback(sample_shards: Path,
                                                                            tmp_path: Path) -> None:
    """SIGTERM to rank 1 while it imports torch, before its stop handler could be installed: the
    signal's default action killed it (exit -15), and torchrun printed its ChildFailedError
    traceback and exited 1 (a crash, restarted, to ``docker/entrypoint.sh``).  Now the stop is
    remembered from the first line of ``python -m service`` and honoured once the handler is in:
    nothing to save yet, so every rank ends, exit 0, one line each."""
    job = Service(sample_shards, tmp_path / "run", "--epochs", "1", launcher=TORCHRUN_2)
    try:
        pid = rank_pid(job.proc.pid, 1)
        _wait_importing_torch(pid)
        os.kill(pid, signal.SIGTERM)
        rc = job.wait(timeout=120)
    finally:
        job.kill()
    assert rc == 0, job.stderr[-3000:]
    assert "Traceback" not in job.stderr, job.stderr[-3000:]
    lines = _service_lines(job)
    assert f"service: rank 1: {WAITING}" in lines and f"service: rank 0: {TOLD.format(rank=1)}" in lines, lines
    assert not list((tmp_path / "run").glob("checkpoint-*")), "nothing was trained"
