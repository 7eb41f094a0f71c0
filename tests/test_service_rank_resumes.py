"""Two gloo ranks through torchrun (real processes) meeting a run directory that changed under
them: made read-only mid-run, and restarts with other settings or from an older checkpoint.
Each must end with one line from the rank that knows, no traceback and no hang."""
from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.mounts import tmpfs
from tests.service_proc import TORCHRUN_2, Service, checkpoint_steps, events, free_port, run_service

pytestmark = pytest.mark.slow
LAUNCH_2 = ("-m", "service.launch", *TORCHRUN_2[2:])  # make train-local NPROC=2's launcher
# Rank 1 runs in its own run directory, $RANK1_OUT (a node with a copy of its own).
OWN_OUT_RANK_1 = """#!/bin/sh
[ "$RANK" = 1 ] && exec {python} -m service "$@" --out "$RANK1_OUT"
exec {python} -m service "$@"
"""


def test_a_run_directory_made_read_only_mid_run_is_one_line_and_exit_4(sample_shards: Path, tmp_path: Path) -> None:
    """A read-only file system mounted over the run directory during epoch 1 (a remount of the
    directory's own file system is refused while the service holds its logs open for writing; a
    mount over it fails every new file the same way, EROFS).  Rank 0's history.json write failed,
    and the removal of its temporary file, in ``except``, failed again (EROFS, not ENOENT): an
    ``OSError`` traceback over the diagnosis.  Now rank 0 names the file (exit 4), rank 1 points at
    rank 0's line."""
    out, exit_file = tmp_path / "run", tmp_path / "exit-code"
    job = Service(sample_shards, out, "--epochs", "2", "--http.port", str(free_port(2)), launcher=LAUNCH_2,
                  env={"ALEXNET_EXIT_FILE": str(exit_file)})
    try:
        job.wait_for(r"epoch 1 step 1/3")
        with tmpfs(out, "ro,size=1m"):
            rc = job.wait(timeout=120)
    finally:
        job.kill()
        subprocess.run(["umount", "-l", str(out)], capture_output=True)
    said = [line for line in job.errors if line.startswith("service: ")]
    assert "Traceback" not in job.stderr, job.stderr[-3000:]
    assert said[0] == (f"service: writing {out / 'history.json'} failed: OSError: [Errno 30] Read-only file system: "
                       f"'{out / '.history.json.tmp'}'; there is no older checkpoint"), said
    assert said[1:] == ["service: rank 1: stopped: another rank of this job ended first; its own line says why"], said
    assert rc == 4 and exit_file.read_text() == "4\n"


def test_a_rank_whose_copy_of_the_chosen_checkpoint_is_another_runs_refuses(sample_shards: Path, tmp_path: Path) -> None:
    """Rank 1's run directory (its node's copy) holds a checkpoint of the name rank 0 chose but
    another run's state: step 3 of a 1-rank run (mid-epoch), where rank 0's is the end of epoch 1
    of a 2-rank run, same settings.  Rank 1 restored it without a word (the ranks compared the
    step alone), trained epoch 1 again while rank 0 trained epoch 2, and the job hung in a
    collective.  Now every rank refuses before training, exit 2, naming rank 1's file."""
    out, other, wrapper = tmp_path / "run", tmp_path / "other", tmp_path / "wrapper.sh"
    rc, first = run_service(sample_shards, out, "--epochs", "1", "--http.port", str(free_port(2)), launcher=LAUNCH_2)
    assert rc == 0 and checkpoint_steps(out) == [3], first.stderr
    rc, single = run_service(sample_shards, other, "--epochs", "1", "--checkpoint.every_steps", "3")
    assert rc == 0 and checkpoint_steps(other) == [3, 6], single.stderr
    (other / "checkpoint-000000006.pt").unlink()
    wrapper.write_text(OWN_OUT_RANK_1.format(python=sys.executable))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    job = Service(sample_shards, out, "--epochs", "2", "--http.port", str(free_port(2)),
                  launcher=(*LAUNCH_2, "--no-python"), program=(str(wrapper),), env={"RANK1_OUT": str(other)})
    try:
        rc = job.wait(timeout=90)  # the hang: until gloo's 30-minute timeout
    finally:
        job.kill()
    said = [line for line in job.errors if line.startswith("service: ")]
    theirs = events(other, "start")[0]["run_id"]
    assert rc == 2, job.stdout[-2000:] + job.stderr[-2000:]
    (own,) = [line for line in said if not line.startswith("service: rank 1: ")] or [said]  # rank 1's; rank 0 says
    assert sorted(said) == sorted([own, own.replace("service: ", "service: rank 1: ", 1)]), said  # it as rank 1's
    assert own.startswith(f"service: {other / 'checkpoint-000000003.pt'} is not the checkpoint rank 0 resumes from: "
                          f"run {theirs} saved it "), own
    assert own.endswith("every rank must see the same run directory (shared storage)"), own
    assert "Traceback" not in job.stderr, job.stderr[-3000:]
    assert "epoch 2 step" not in job.stdout and checkpoint_steps(out) == [3]


@pytest.fixture(scope="module")
def two_epochs(sample_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-rank run of 2 epochs, 1-view evaluations: checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("two_epochs") / "run"
    rc, first = run_service(sample_shards, out, "--epochs", "2", "--http.port", str(free_port(2)), launcher=LAUNCH_2)
    assert rc == 0 and checkpoint_steps(out) == [3, 6], first.stderr
    return out


def _said(job: Service, text: str) -> int:
    return sum(text in line for line in job.errors + job.lines)


def test_two_ranks_resume_an_older_checkpoint_with_other_eval_views_as_one(two_epochs: Path, sample_shards: Path,
                                                                           tmp_path: Path) -> None:
    """The newest checkpoint deleted and --eval_views changed at the restart, on 2 ranks: rank 0
    alone rewrites history.json and says so once, both ranks wait for a new best afresh (each
    JSON log records it, the console once), and epoch 2's record gives its 10 views."""
    out = tmp_path / "run"
    shutil.copytree(two_epochs, out)
    (out / "checkpoint-000000006.pt").unlink()
    before = sorted(p.name for p in out.iterdir())
    rc, job = run_service(sample_shards, out, "--epochs", "2", "--eval_views", "10", "--http.port", str(free_port(2)),
                          launcher=LAUNCH_2)
    assert rc == 0, job.stderr[-3000:]
    assert _said(job, "history.json listed epoch(s) 1, 2, ") == 1, job.stderr
    assert _said(job, "was evaluated with eval_views 1, this run with 10") == 1, job.stderr
    assert [len(events(out, "eval_views_changed", rank)) for rank in (0, 1)] == [1, 1]
    history = json.loads((out / "history.json").read_text())
    assert [(r["epoch"], r["eval_views"]) for r in history] == [(1, 1), (2, 10)], history
    assert sorted(p.name for p in out.iterdir()) == sorted({*before, "checkpoint-000000006.pt"})  # nothing of rank 1's
    schedules = torch.load(out / "checkpoint-000000006.pt", weights_only=True)["schedule"]
    assert (schedules["best"], schedules["evals_without_improvement"]) == (history[1]["top1_error"], 0)


def test_two_ranks_restarted_with_fewer_epochs_say_where_the_run_stands_once(two_epochs: Path, sample_shards: Path,
                                                                             tmp_path: Path) -> None:
    """--epochs 1 after 2 trained, on 2 ranks: both end at once, exit 0, no step trained and no
    checkpoint written, and the console says once that the run stands past --epochs."""
    out = tmp_path / "run"
    shutil.copytree(two_epochs, out)
    rc, job = run_service(sample_shards, out, "--epochs", "1", "--http.port", str(free_port(2)), launcher=LAUNCH_2)
    assert rc == 0, job.stderr[-3000:]
    assert _said(job, "finished: 2 epoch(s), 6 steps, more than --epochs 1 asks: the run stands at end of epoch 2") == 1
    assert checkpoint_steps(out) == [3, 6] and [len(events(out, "finished", rank)) for rank in (0, 1)] == [2, 2]
