"""Start-up checks of the service in real processes: a run directory it cannot write (one line,
exit 5, before anything slow), the build labels of a container (the revision it was built from),
and what a start reads of the shards (manifest.json and each DALI index once, ``tests.open_audit``).

Root ignores permission bits, so the run directory is made unwritable for real: a read-only tmpfs
mounted for the test (skipped where mounting is not allowed)."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.errors import EXIT_RUNDIR
from tests.mounts import tmpfs
from tests.service_proc import TORCHRUN_2, free_port, run_service

ROOT = Path(__file__).resolve().parents[1]


def python(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``python args`` from the repository root in a fresh interpreter, with ``env`` added."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


@pytest.fixture
def read_only(tmp_path: Path):
    """A directory on a read-only tmpfs, unmounted afterwards."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        yield mnt


@pytest.mark.parametrize("sub", ["", "run"])  # the mount point itself, and a directory to create in it
def test_unwritable_run_directory_is_one_line_and_exit_5(read_only: Path, sub: str, tmp_path: Path) -> None:
    out = read_only / sub if sub else read_only
    exit_file = tmp_path / "exit-code"
    result = python("-m", "service", "--shards", str(tmp_path / "no-shards"), "--out", str(out), "--http.port", "0",
                    ALEXNET_EXIT_FILE=str(exit_file))
    assert result.returncode == EXIT_RUNDIR == 5, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"service: run directory {out} cannot be written (Read-only file system)"), line
    assert "--out" in line and result.stdout == ""  # checked before anything else happens
    assert exit_file.read_text() == "5\n"  # for docker/entrypoint.sh: a diagnosed exit is not restarted


@pytest.mark.parametrize("sub", ["", "run"])  # the file itself, and a directory under it
def test_a_run_directory_that_is_a_file_is_one_line_naming_the_file(sub: str, tmp_path: Path) -> None:
    """Was "cannot be written (File exists) ... make it writable": nothing to do with permissions."""
    file = tmp_path / "notes.txt"
    file.write_text("not a run directory\n")
    out = file / sub if sub else file
    result = python("-m", "service", "--shards", str(tmp_path / "no-shards"), "--out", str(out), "--http.port", "0")
    assert result.returncode == EXIT_RUNDIR, result.stderr
    assert result.stderr == (f"service: run directory {out}: {file} is a file, not a directory: choose another "
                             "directory with --out (a new one is created), or move the file away\n")
    assert file.read_text() == "not a run directory\n" and result.stdout == ""


def test_build_info_carries_the_images_revision() -> None:
    # The image has no .git: its build passes the revision in ALEXNET_GIT_REVISION.
    code = "from service.metrics import build_labels; print(build_labels('cpu', 'grouped', 1)['git_revision'])"
    result = python("-c", code, ALEXNET_GIT_REVISION="0123456789ab-dirty")
    assert result.stdout.strip() == "0123456789ab-dirty", result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("verify, ranks", [("background", 1), ("before", 1), ("background", 2)])
def test_a_start_reads_the_manifest_and_each_index_once(sample_shards: Path, tmp_path: Path,
                                                        verify: str, ranks: int) -> None:
    """Each rank reads ``manifest.json`` once and each ``.idx`` of both splits once at start: rank 0's
    shard check reads the indexes (and with ``verify before`` hashes the tars, which needs no index
    again), the other ranks check their own.  Was, on rank 0: the manifest three times (the shard
    directory check before the port, the shard check's, the full check's) and every index twice
    (``verify before``: three times), so on ImageNet ~1000 train indexes twice, and two reads of one
    file could disagree.  ``stats.json`` and ``mean_image.npy`` once too: they were read three times
    (the run identity's summary, then each loader's build).  The background pass, once training
    runs, is not the start: left out."""
    log = tmp_path / "opens.jsonl"
    audit = ("-m", "tests.open_audit", str(log), str(sample_shards))  # every rank, under torchrun
    launcher, port = ((*TORCHRUN_2, *audit), ("--http.port", str(free_port(2)))) if ranks == 2 else (audit, ())
    rc, service = run_service(sample_shards, tmp_path / "run", "--epochs", "1", "--data.verify", verify, *port,
                              launcher=launcher, timeout=300)
    assert rc == 0, service.stderr
    opens = [json.loads(line) for line in log.read_text().splitlines()]
    names = ["manifest.json", "stats.json", "mean_image.npy",
             *sorted(p.name for p in sample_shards.glob("*/*.idx"))]  # train-000000.idx ...
    assert len(names) == 3 + 10 and all((sample_shards / name).is_file() for name in names[:3])
    counts = collections.Counter((o["rank"], Path(o["path"]).name) for o in opens if o["thread"] != "shard-check")
    read = {rank: {name: counts[rank, name] for name in names} for rank in range(ranks)}
    assert read == {rank: dict.fromkeys(names, 1) for rank in range(ranks)}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("flags, says", [
    (("--device", "cuda"), "device 'cuda': no CUDA device is visible to this process (torch.cuda.is_available() "
                           "is False); use --device cpu or auto"),
    (("--device", "cpu", "--model.layout", "towers", "--model.devices", "cuda:0,cuda:1"),
     "model.devices names cuda:0, but no CUDA device is visible to this process")])
def test_a_cuda_device_that_is_not_there_is_one_line_and_exit_2(sample_shards: Path, tmp_path: Path, flags: tuple,
                                                                says: str) -> None:
    """The service's and predict's checks share ``service.build.cuda_problem`` (they were written
    twice); without CUDA a model.devices entry was 'only 0 CUDA device(s) are visible'."""
    rc, service = run_service(sample_shards, tmp_path / "run", *flags, timeout=120)
    assert rc == 2 and "Traceback" not in service.stderr, service.stderr
    assert says in service.stderr.strip().splitlines()[-1], service.stderr
