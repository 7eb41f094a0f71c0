"""What the service does with bad input, as a real process: damaged checkpoints, a checkpoint of
another run, bad shards, bad settings, a taken port.  Each ends with a clear message and its
exit code, never a traceback or a hang."""
from __future__ import annotations

import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from shards.build import build
from shards.config import ShardConfig
from tests.service_proc import ROOT, TINY, TORCHRUN_2, Service, checkpoint_steps, run_service


@pytest.fixture(scope="module")
def finished_run(sample_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run with checkpoints at steps 2, 4 and 6 (the epoch end)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    rc, service = run_service(sample_shards, out, "--epochs", "1", "--checkpoint.every_steps", "2")
    assert rc == 0, service.stderr
    assert checkpoint_steps(out) == [2, 4, 6]
    return out


def _copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


@pytest.mark.slow
def test_damaged_newest_checkpoints_are_set_aside_and_the_previous_one_used(
        finished_run: Path, sample_shards: Path, tmp_path: Path) -> None:
    out = _copy_run(finished_run, tmp_path)
    newest, second = out / "checkpoint-000000006.pt", out / "checkpoint-000000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated (a crash while copying)
    data = bytearray(second.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # damaged in place: same size, loads with torch
    second.write_bytes(bytes(data))
    rc, service = run_service(sample_shards, out, "--epochs", "1", "--checkpoint.every_steps", "2")
    assert rc == 0, service.stderr
    assert f"checkpoint {newest} is unreadable" in service.stderr
    assert f"checkpoint {second} is unreadable (checksum mismatch" in service.stderr
    assert "from " + str(out / "checkpoint-000000002.pt") in service.stdout
    assert "epoch 1 step 2/6 (step 2 in all)" in service.stdout
    assert (out / "checkpoint-000000006.pt.corrupt").exists() and checkpoint_steps(out) == [2, 4, 6]


@pytest.mark.slow
def test_a_checkpoint_of_another_run_is_refused_unless_fresh(finished_run: Path, sample_shards: Path,
                                                             tmp_path: Path) -> None:
    out = _copy_run(finished_run, tmp_path)
    rc, service = run_service(sample_shards, out, "--epochs", "1", "--loader.batch_size", "16")
    assert rc == 2 and "Traceback" not in service.stderr
    assert "loader.batch_size is 24 there and 16 here" in service.stderr and "--fresh true" in service.stderr
    assert checkpoint_steps(out) == [2, 4, 6]  # refused: nothing touched

    fresh = Service(sample_shards, out, "--epochs", "1", "--loader.batch_size", "16", "--fresh", "true")
    fresh.wait_for(r"fresh start: deleted \d+ file")
    fresh.wait_for(r"new run ")
    fresh.wait_for(r"epoch 1 step 1/9")  # 144 images at batch 16
    fresh.signal()
    assert fresh.wait() == 0, fresh.stderr
    stopped_at = int(fresh.wait_for(r"stopped \(SIGTERM\) at step (\d+)").group(1))
    assert checkpoint_steps(out) == [stopped_at]  # the old run's checkpoints are gone


@pytest.mark.slow
def test_finished_run_says_so(finished_run: Path, sample_shards: Path, tmp_path: Path) -> None:
    out = _copy_run(finished_run, tmp_path)
    rc, service = run_service(sample_shards, out, "--epochs", "1")
    assert rc == 0 and "1 epoch(s) done" in service.stdout and "finished: 1 epoch(s)" in service.stdout


@pytest.fixture
def shards_copy(sample_shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(sample_shards, copy)
    return copy


@pytest.mark.slow
def test_truncated_and_missing_shards_are_named(shards_copy: Path, tmp_path: Path) -> None:
    tar = sorted((shards_copy / "train").glob("*.tar"))[3]
    with open(tar, "r+b") as f:
        f.truncate(tar.stat().st_size // 2)
    rc, service = run_service(shards_copy, tmp_path / "run", "--epochs", "1", timeout=120)
    assert rc == 1 and str(tar) in service.stderr and "truncated" in service.stderr
    assert "Traceback" not in service.stderr
    val = sorted((shards_copy / "val").glob("*.tar"))[0]
    tar.unlink()
    val.unlink()
    rc, service = run_service(shards_copy, tmp_path / "run", "--epochs", "1", timeout=120)
    assert rc == 1 and "missing" in service.stderr and (str(tar) in service.stderr or str(val) in service.stderr)


@pytest.mark.slow
def test_an_undecodable_shard_stops_the_run_naming_it(shards_copy: Path, tmp_path: Path) -> None:
    tar = sorted((shards_copy / "train").glob("*.tar"))[2]
    with tarfile.open(tar) as t:
        jpg = next(m for m in t.getmembers() if m.name.endswith(".jpg"))
    with open(tar, "r+b") as f:  # same size, so only the decoder can notice
        f.seek(jpg.offset_data + 200)
        f.write(b"\xff" * 2000 + bytes(3000))
    rc, service = run_service(shards_copy, tmp_path / "run", "--epochs", "1", timeout=240)
    assert rc == 1, service.stderr
    assert f"train shard {tar}: contents differ from the manifest's sha256" in service.stderr
    assert "Traceback" not in service.stderr


def test_bad_settings_exit_2_naming_the_keys(sample_shards: Path, tmp_path: Path) -> None:
    """``--loader.threads 100000`` was exit 134 and DALI's ``terminate called without an active
    exception``, no key named; ``--optim.lr 0`` trained the whole run without moving a weight."""
    rc, service = run_service(sample_shards, tmp_path / "run", "--loader.dtype", "bfloat16", "--epochs", "0",
                              "--loader.threads", "100000", "--optim.lr", "0", timeout=120)
    assert rc == 2 and "Traceback" not in service.stderr
    assert "loader.dtype bfloat16 needs model.autocast" in service.stderr and "epochs must be >= 1" in service.stderr
    assert "loader.threads must be in 0..1024" in service.stderr and "optim.lr must be a number > 0" in service.stderr
    assert len(service.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing started


def test_port_in_use_is_one_clear_line(sample_shards: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, service = run_service(sample_shards, tmp_path / "run", "--http.port", str(port), timeout=120)
    assert rc == 3
    assert service.stderr.strip() == (f"service: port {port} on 127.0.0.1 is already in use (another run or "
                                      "exporter?): stop it or choose another port with --http.port N "
                                      "(make demo / train-local: PORT=N)")
    # The run directory it created is gone again (it held the lock file alone, and make clean then
    # kept it as "a training run").
    assert not (tmp_path / "run").exists(), sorted(os.listdir(tmp_path / "run"))


@pytest.mark.slow
def test_a_diverging_run_stops_with_exit_6_and_keeps_its_last_good_checkpoint(
        sample_shards: Path, tmp_path: Path) -> None:
    """lr 5 overflows the loss within an epoch.  The step count puts a checkpoint on step 4, which
    is where the loss first became NaN (between log windows: --log_every 100), so it is the check
    before a checkpoint that catches it: nothing NaN is written and the finite step-2 checkpoint is
    not pruned for it (keep 1)."""
    out, exit_file = tmp_path / "run", tmp_path / "exit-code"
    service = Service(sample_shards, out, "--epochs", "2", "--optim.lr", "5", "--checkpoint.keep", "1",
                      "--checkpoint.every_steps", "2", "--log_every", "100",
                      env={"ALEXNET_EXIT_FILE": str(exit_file)})
    try:
        rc = service.wait(240)
    finally:
        service.kill()
    assert rc == 6 and exit_file.read_text() == "6\n", service.stderr  # docker/entrypoint.sh: not restarted
    (line,) = service.stderr.strip().splitlines()
    assert re.match(r"service: training diverged at step \d+ \(epoch 1 step \d/6\): the epoch's summed training "
                    r"loss is nan; stopped without checkpointing it, the newest good checkpoint is ", line), line
    assert "Lower optim.lr (now 5)" in line and "finished" not in service.stdout
    (kept,) = out.glob("checkpoint-*.pt")
    assert str(kept) in line
    model = torch.load(kept, map_location="cpu", weights_only=True)["model"]
    assert all(torch.isfinite(t).all() for t in model.values())


def test_a_batch_larger_than_a_ranks_share_of_the_images_is_refused_before_the_model(sample_shards: Path,
                                                                                     tmp_path: Path) -> None:
    rc, service = run_service(sample_shards, tmp_path / "run", "--loader.batch_size", "100000", timeout=120)
    assert rc == 2, service.stderr
    assert service.stderr.strip() == (f"service: invalid settings for these shards: loader.batch_size 100000 is more "
                                      f"than the 144 training images each of the 1 rank(s) gets per epoch from "
                                      f"{sample_shards}: use at most 144")
    assert "train: " not in service.stdout  # refused before the model and the loaders were built


def test_a_shuffle_buffer_larger_than_memory_allows_is_refused_naming_the_estimate(
        sample_shards: Path, tmp_path: Path) -> None:
    """DALI reads the whole buffer of encoded samples before the first batch: 1,000,000,000 grew to
    ~21 GB and the OOM killer ended it without a line.  The child's address space is capped at
    8 GB, so a regression fails here (exit 1, ``std::bad_alloc`` blamed on the data, as before the
    fix) rather than taking the machine's memory."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 * 10**9, 8 * 10**9))

    cmd = [sys.executable, "-m", "service", "--shards", str(sample_shards), "--out", str(tmp_path / "run"), *TINY,
           "--loader.shuffle_buffer", "1000000000"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, preexec_fn=cap,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2, run.stderr[-3000:]
    assert re.fullmatch(r"service: invalid settings for these shards: loader.shuffle_buffer 1000000000 would hold "
                        r"about [\d,]+\.\d GB of encoded training samples in memory \(\d+ bytes each, the shards' "
                        r"mean\): more than 1/4 of the [\d.]+ GB available on this machine: use at most \d+\n",
                        run.stderr), run.stderr
    assert "train: " not in run.stdout  # refused before the model and the loaders were built


def test_a_crop_larger_than_the_shards_images_is_refused_naming_their_size(sample_src: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    build(ShardConfig(src=sample_src, out=shards, size=232, shard_samples=50, workers=2).validate())
    rc, service = run_service(shards, tmp_path / "run", "--loader.crop", "240", timeout=120)
    assert rc == 2, service.stderr
    assert service.stderr.strip() == (f"service: invalid settings for these shards: loader.crop 240 is larger than "
                                      f"the 232x232 px images of {shards} (its manifest.json): use at most 232")


def _in_use(out: Path, pid: int, rank: int = 0) -> str:
    return (f"service: run directory {out} is in use by another service (pid {pid} on {socket.gethostname()}, "
            f"rank {rank}): two runs in one directory overwrite each other's checkpoints. Stop that one first, or "
            "choose another directory with --out")


@pytest.mark.slow
def test_a_second_service_on_a_run_directory_in_use_is_refused_and_a_kill_frees_it(sample_shards: Path,
                                                                                   tmp_path: Path) -> None:
    """Two services on one --out overwrote each other's checkpoints, and the second one's start
    deleted the first one's checkpoint in flight.  The lock dies with its process (kill -9)."""
    out = tmp_path / "run"
    first = Service(sample_shards, out, "--epochs", "50")
    try:
        first.wait_for(r"epoch 1 step 1/6")
        in_flight = out / f".checkpoint-000000099.pt.{first.proc.pid}.tmp"
        in_flight.write_bytes(b"the first service is writing this")
        rc, second = run_service(sample_shards, out, "--epochs", "1", timeout=120)
        assert rc == 5 and second.stdout == "", second.stderr
        assert second.stderr.strip() == _in_use(out, first.proc.pid)
        assert in_flight.exists() and first.proc.poll() is None  # nothing of the first one's touched
    finally:
        first.kill()  # SIGKILL: no handler runs, the kernel drops the lock
    again = Service(sample_shards, out, "--epochs", "1")
    try:
        again.wait_for(r"new run |resuming run ")
        assert not in_flight.exists()  # now a stale temporary file, removed
    finally:
        again.kill()


@pytest.mark.slow
def test_a_second_torchrun_job_on_a_run_directory_in_use_fails_at_once(sample_shards: Path, tmp_path: Path) -> None:
    """The ranks of one job share the directory (a lock per rank); a second job's ranks each find
    theirs held and refuse before joining: no rank is left waiting for a peer."""
    out, exit_file = tmp_path / "run", tmp_path / "exit-code"
    first = Service(sample_shards, out, "--epochs", "50", launcher=TORCHRUN_2)
    try:
        first.wait_for(r"epoch 1 step 1/3")
        second = Service(sample_shards, out, "--epochs", "1", launcher=TORCHRUN_2,
                         env={"ALEXNET_EXIT_FILE": str(exit_file)})
        try:
            second.wait(timeout=120)
        finally:
            second.kill()
        refusal = f"service: run directory {out} is in use by another service (pid "
        said = [line for line in second.errors if line.startswith(refusal)]
        assert sorted(line.split("rank ")[1][0] for line in said) == ["0", "1"], second.stderr
        assert exit_file.read_text() == "5\n" and first.proc.poll() is None
    finally:
        first.kill()
