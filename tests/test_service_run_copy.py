"""A run directory copied by its user (``cp -a runs/r1 runs/r2``) and started again, as real
service processes: the copy resumed its checkpoint under the original's run id, so two runs
trained apart under one id (one /status run_id, one ``start`` event id, one checkpoint identity)
and their logs and dashboards mixed.  Now the copy is recognised, says so in one line and trains
under an id of its own, across its restarts; a moved directory (``mv``) keeps its id, and
checkpoints written before the run directory was recorded in them resume as before."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from service import checkpoint as ckpt
from tests.service_proc import TORCHRUN_2, Service, checkpoint_steps, events, free_port, run_service
from tests.test_service_checkpoints import _rewrite

pytestmark = pytest.mark.slow
COPY_LINE = re.compile(r"^(\S+) is a copy of run (\S+)'s directory (\S+) \(its checkpoint (\S+) was written there\): "
                       r"this copy trains as run (\S+) from here on$")


@pytest.fixture(scope="module")
def original(sample_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run with checkpoints at steps 2, 4 and 6 (the epoch end)."""
    out = tmp_path_factory.mktemp("original") / "r1"
    rc, service = run_service(sample_shards, out, "--epochs", "1", "--checkpoint.every_steps", "2")
    assert rc == 0 and checkpoint_steps(out) == [2, 4, 6], service.stderr
    return out


def _cp_a(run: Path, to: Path) -> Path:
    subprocess.run(["cp", "-a", str(run), str(to)], check=True)
    return to


def _copy_lines(service: Service) -> list[re.Match]:
    return [m for line in service.lines if (m := COPY_LINE.match(line))]


def test_a_copied_run_directory_trains_under_an_id_of_its_own_across_restarts(original: Path, sample_shards: Path,
                                                                              tmp_path: Path) -> None:
    """The reported case: ``cp -a runs/r1 runs/r2`` and the service started on r2 said "resuming run
    r1-...", wrote r1's id into its start event and /status and into its own checkpoints.  Now: one
    line that it is a copy and its new id; a restart before the copy's first own checkpoint
    (still r1's step 6) and one after it resume under that id, not refused as another run's."""
    theirs = events(original, "start")[-1]["run_id"]
    copy = _cp_a(original, tmp_path / "r2")
    rc, first = run_service(sample_shards, copy, "--epochs", "1")  # nothing to train: no checkpoint of its own
    assert rc == 0, first.stderr
    (said,) = _copy_lines(first)
    ours = said.group(5)
    assert said.groups()[:4] == (str(copy), theirs, str(original.resolve()), str(ckpt.path_for(copy, 6))), said.group(0)
    assert ours != theirs and ours.startswith("r2-copy-"), ours
    assert f"resuming run {ours} from {ckpt.path_for(copy, 6)}" in first.stdout, first.stdout
    start = events(copy, "start")[-1]
    assert (start["run_id"], start["copied_from"]) == (ours, theirs)
    assert checkpoint_steps(copy) == [2, 4, 6]

    second = Service(sample_shards, copy, "--epochs", "2", "--checkpoint.every_steps", "100")
    assert second.stop_at(r"epoch 2 step 2/6") == 0, second.stderr  # the stop writes the copy's own checkpoint
    assert f"resuming run {ours} from {ckpt.path_for(copy, 6)}" in second.stdout, second.stdout + second.stderr
    assert [m.group(5) for m in _copy_lines(second)] == [ours]
    own = checkpoint_steps(copy)[-1]
    newest = ckpt.load(ckpt.path_for(copy, own))
    assert own > 6 and newest["run_id"] == ours and newest["run_dir"]["path"] == str(copy.resolve())

    rc, third = run_service(sample_shards, copy, "--epochs", "2")
    assert rc == 0, third.stderr
    assert f"resuming run {ours} from {ckpt.path_for(copy, own)}" in third.stdout, third.stdout + third.stderr
    assert not _copy_lines(third), third.stdout  # its own checkpoint now: nothing to say
    assert [e["run_id"] for e in events(copy, "start")][-3:] == [ours] * 3
    assert {e["run_id"] for e in events(original, "start")} == {theirs}  # the original untouched


def test_a_moved_run_directory_keeps_its_id_and_an_older_checkpoint_resumes_as_before(
        original: Path, sample_shards: Path, tmp_path: Path) -> None:
    """``mv runs/r1 runs/r3`` is the same run in another place (same directory, its inode): it
    keeps its id without a word.  A copy whose checkpoints were written before the run directory
    was recorded in them cannot be told from the original: it resumes under the old id, as before."""
    theirs = events(original, "start")[-1]["run_id"]
    moved = tmp_path / "r3"
    os.rename(original, moved)
    try:
        rc, service = run_service(sample_shards, moved, "--epochs", "1")
    finally:
        os.rename(moved, original)
    assert rc == 0, service.stderr
    assert not _copy_lines(service) and f"resuming run {theirs} from" in service.stdout, service.stdout

    older = _cp_a(original, tmp_path / "older")
    for step in checkpoint_steps(older):
        _rewrite(ckpt.path_for(older, step), lambda p: p.pop("run_dir", None))
    rc, service = run_service(sample_shards, older, "--epochs", "1")
    assert rc == 0, service.stderr
    assert not _copy_lines(service) and f"resuming run {theirs} from" in service.stdout, service.stdout


def test_two_ranks_agree_on_the_id_of_a_new_run_and_of_a_copy(sample_shards: Path, tmp_path: Path) -> None:
    """Rank 0 alone looks at the checkpoint and the directory; every rank trains under its id.  (A
    new run's id was each rank's own clock: ranks starting across a second apart logged two ids.)"""
    out = tmp_path / "r1"
    rc, first = run_service(sample_shards, out, "--epochs", "1", "--http.port", str(free_port(2)),
                            launcher=TORCHRUN_2)
    assert rc == 0 and checkpoint_steps(out) == [3], first.stderr
    theirs = events(out, "start")[-1]["run_id"]
    assert events(out, "start", rank=1)[-1]["run_id"] == theirs
    copy = _cp_a(out, tmp_path / "r2")
    rc, job = run_service(sample_shards, copy, "--epochs", "1", "--http.port", str(free_port(2)), launcher=TORCHRUN_2)
    assert rc == 0, job.stderr
    (said,) = _copy_lines(job)
    ours = said.group(5)
    assert ours != theirs and [events(copy, "start", rank)[-1]["run_id"] for rank in (0, 1)] == [ours, ours]
    assert [events(copy, "start", rank)[-1]["copied_from"] for rank in (0, 1)] == [theirs, theirs]
