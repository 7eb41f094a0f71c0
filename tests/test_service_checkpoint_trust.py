"""Files in a run directory that are named like checkpoints but cannot be trusted as one, as real
service processes and real files: a checkpoint copied or renamed to another step's name, a
checkpoint of another run (a copy or a symbolic link), and names that are not regular files
(a FIFO, a directory, a dangling symbolic link).  Each is one line and exit 2 before anything
is trained or renamed, never a hang, a traceback or a silent resume of the wrong file."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from service import checkpoint as ckpt
from service.errors import ServiceError
from tests.conftest import run_module
from tests.service_proc import TORCHRUN_2, checkpoint_steps, events, run_service
from tests.test_service_checkpoints import _rewrite
from tests.test_service_failures import _copy_run, finished_run  # noqa: F401 (a fixture: checkpoints 2, 4, 6)

pytestmark = pytest.mark.slow


def _only_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_a_checkpoint_renamed_to_a_later_step_is_refused_naming_both_steps(finished_run: Path, sample_shards: Path,
                                                                           tmp_path: Path) -> None:
    """The reviewer's repro: a step-4 file named for step 50 was resumed, and every later start
    went back to it, throwing away what was trained after it."""
    out = _copy_run(finished_run, tmp_path)
    renamed = ckpt.path_for(out, 50)
    shutil.copyfile(ckpt.path_for(out, 4), renamed)
    ckpt.path_for(out, 4).unlink()
    rc, service = run_service(sample_shards, out, "--epochs", "2", timeout=180)
    assert rc == 2 and "resuming" not in service.stdout, service.stdout
    line = _only_line(service.stderr)
    assert line.startswith(f"service: checkpoint {renamed} is named for step 50 but holds step 4"), line
    assert "Rename it to checkpoint-000000004.pt or remove it" in line
    assert checkpoint_steps(out) == [2, 6, 50] and not list(out.glob("*.corrupt"))  # nothing renamed


def test_a_linked_checkpoint_of_another_run_with_the_same_recipe_is_refused(finished_run: Path, sample_shards: Path,
                                                                            tmp_path: Path) -> None:
    """Same recipe and shards (so the identity check passes), another run: resuming it replaced
    this directory's history with the other run's, said only by the run id in "resuming run"."""
    out = _copy_run(finished_run, tmp_path)
    ours = events(out, "start")[-1]["run_id"]
    other = tmp_path / "other"
    other.mkdir()
    theirs = other / "checkpoint-000000006.pt"
    shutil.copyfile(ckpt.path_for(out, 6), theirs)
    _rewrite(theirs, lambda p: p.update(run_id="other-20240101-000000"))
    ckpt.path_for(out, 6).unlink()
    ckpt.path_for(out, 6).symlink_to(theirs)
    rc, service = run_service(sample_shards, out, "--epochs", "1", timeout=180)
    assert rc == 2 and "resuming" not in service.stdout, service.stdout
    line = _only_line(service.stderr)
    assert line.startswith(f"service: checkpoint {ckpt.path_for(out, 6)} is of run other-20240101-000000, "
                           f"but this run directory's run is {ours} (its log.jsonl)"), line
    assert "Remove it" in line


def test_a_fifo_named_like_a_checkpoint_is_refused_without_opening_it(finished_run: Path, sample_shards: Path,
                                                                      tmp_path: Path) -> None:
    """open() of a FIFO blocks until a writer comes: the start hung, deaf to SIGTERM."""
    out = _copy_run(finished_run, tmp_path)
    fifo = ckpt.path_for(out, 99)
    os.mkfifo(fifo)
    rc, service = run_service(sample_shards, out, "--epochs", "1", timeout=120)
    assert rc == 2, service.stderr
    line = _only_line(service.stderr)
    assert line == (f"service: checkpoint {fifo} is a FIFO (named pipe), not a regular file; it was not opened and "
                    f"nothing was changed. Remove it or move it out of {out} and run the same command again")


def _refusal(out: Path) -> str:
    with pytest.raises(ServiceError) as caught:
        ckpt.newest_valid(out, print)
    return str(caught.value)


def test_a_dangling_link_or_a_directory_as_a_checkpoint_is_named_as_such(finished_run: Path, tmp_path: Path) -> None:
    """Both were "cannot be read (No such file or directory / Is a directory) ... Make it readable
    for that user": advice that does not fit."""
    out = _copy_run(finished_run, tmp_path)
    link = ckpt.path_for(out, 8)
    link.symlink_to(tmp_path / "gone.pt")
    assert _refusal(out) == (f"checkpoint {link} is a symbolic link to {tmp_path / 'gone.pt'}, which does not exist; "
                             "nothing was changed. Restore that file or remove the link, and run the same command "
                             "again")
    link.unlink()
    directory = ckpt.path_for(out, 8)
    directory.mkdir()
    assert _refusal(out) == (f"checkpoint {directory} is a directory, not a regular file; it was not opened and "
                             f"nothing was changed. Remove it or move it out of {out} and run the same command again")
    assert checkpoint_steps(out) == [2, 4, 6, 8] and not list(out.glob("*.corrupt"))


def test_a_resume_on_more_ranks_says_the_new_split_once(finished_run: Path, sample_shards: Path,
                                                        tmp_path: Path) -> None:
    """Every rank printed the same "written by 1 rank(s), this run has 2" line; rank 0 says it
    now, and every rank still records it in its own JSON log."""
    out = _copy_run(finished_run, tmp_path)
    rc, service = run_service(sample_shards, out, "--epochs", "1", launcher=TORCHRUN_2, timeout=240)
    assert rc == 0, service.stderr
    said = [line for line in service.errors if "was written by 1 rank(s), this run has 2" in line]
    assert len(said) == 1, service.stderr
    assert [len(events(out, "resplit", rank)) for rank in (0, 1)] == [1, 1]


def test_shards_whose_statistics_changed_are_not_resumed_nor_predicted_with(finished_run: Path, sample_shards: Path,
                                                                            sample_src: Path, tmp_path: Path) -> None:
    """The same tars with other statistics (``make shards ... --stats_images 1`` made again): the
    data fingerprint (tar checksums) is the same, and the run resumed with another mean image
    without a word; predict normalised with it too."""
    out, shards = _copy_run(finished_run, tmp_path), tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    mean_image = np.load(shards / "mean_image.npy")
    np.save(shards / "mean_image.npy", mean_image + 20)
    rc, service = run_service(shards, out, "--epochs", "2", timeout=180)
    assert rc == 2 and "resuming" not in service.stdout, service.stdout
    line = _only_line(service.stderr)
    assert line.startswith(f"service: {ckpt.path_for(out, 6)} belongs to another run: the shards' dataset statistics "
                           "are not the ones it trained with: the mean image differs by up to 20"), line
    assert checkpoint_steps(out) == [2, 4, 6]
    image = next(sample_src.glob("val/*/*"))
    predicted = run_module("service.predict", "--run", str(out), "--shards", str(shards), str(image), check=False,
                           timeout=120)
    assert predicted.returncode == 2, predicted.stdout + predicted.stderr
    assert _only_line(predicted.stderr).startswith(
        f"predict: checkpoint-000000006.pt: the shards' dataset statistics (stats.json and mean_image.npy of {shards}) "
        "are not the ones it trained with: the mean image differs by up to 20"), predicted.stderr
