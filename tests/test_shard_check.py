"""Corruption after sharding is never trained on silently (``service.shard_check``): a same-size
corruption inside one training JPEG, as a disk or a copy leaves it, against real tars, the real
DALI loader and the real service process."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest

from pipeline import LoaderConfig, build_train_loader
from service.app import parse
from service.config import TrainConfig
from service.dist import Ranks
from service.errors import DataError, ServiceError
from service.metrics import ServiceMetrics, build_labels
from service.runlog import RunLog
from service.shard_check import ShardCheck, reading_order
from shards import manifest as contract
from tests.service_proc import TORCHRUN_2, Service, events, free_port, run_service

BAD_TAR = "train-000003.tar"  # samples train-00000060 .. 79 of the 8 shards of 20


def flip_jpeg_bytes(tar: Path, count: int = 256) -> str:
    """Invert ``count`` bytes in the middle of the shard's first JPEG (same size); its key."""
    with tarfile.open(tar) as archive:
        jpg = next(m for m in archive.getmembers() if m.name.endswith(".jpg"))
    with open(tar, "r+b") as f:
        f.seek(jpg.offset_data + jpg.size // 2)
        data = f.read(count)
        f.seek(jpg.offset_data + jpg.size // 2)
        f.write(bytes(b ^ 0xFF for b in data))
    return jpg.name.split(".")[0]


@pytest.fixture
def corrupt_shards(sample_shards: Path, tmp_path: Path) -> tuple[Path, str]:
    copy = tmp_path / "shards"
    shutil.copytree(sample_shards, copy)
    return copy, flip_jpeg_bytes(copy / "train" / BAD_TAR)


@pytest.mark.slow
def test_a_flipped_jpeg_stops_the_run_naming_shard_and_sample(corrupt_shards, tmp_path: Path) -> None:
    shards, key = corrupt_shards
    rc, service = run_service(shards, tmp_path / "run", "--epochs", "1", timeout=240)
    assert rc == 1, service.stdout + service.stderr  # was: exit 0, a different loss, samples_failed 0
    assert f"train shard {shards / 'train' / BAD_TAR}: contents differ from the manifest's sha256" in service.stderr
    assert f"sample {key} (source train/" in service.stderr and "the JPEG does not decode" in service.stderr
    assert "Traceback" not in service.stderr
    # It says whether training may have used it: found at start, or after some steps.
    assert "found before this start trained on anything" in service.stderr or (
        "found by the background check at step" in service.stderr and "may have been trained on" in service.stderr)


@pytest.mark.slow
def test_skip_leaves_the_shard_out_counts_it_and_trains_on(corrupt_shards, tmp_path: Path) -> None:
    shards, key = corrupt_shards
    out = tmp_path / "run"
    args = ("--epochs", "2", "--data.on_corrupt", "skip", "--data.verify", "before", "--debug.ids", "true")
    service = Service(shards, out, *args)
    try:
        service.wait_for(r"train: 124 images")  # 144 - the 20 of the corrupt shard
        service.wait_for(r"epoch 1 step 1/6")
        with urllib.request.urlopen(service.url() + "/metrics", timeout=10) as r:
            assert "alexnet_samples_failed_total 20.0" in r.read().decode()
        assert service.wait() == 0, service.stderr
    finally:
        service.kill()
    assert f"{BAD_TAR}: contents differ from the manifest's sha256" in service.stderr
    assert f"sample {key} (source train/" in service.stderr
    assert "skipped: left out of the train reader" in service.stderr
    trained = {i for line in (out / "ids.jsonl").read_text().splitlines() for i in json.loads(line)["ids"]}
    assert len(trained) == 124 and not trained & set(range(60, 80))
    assert [e["shard"] for e in events(out, "shard_skipped")] == [str(shards / "train" / BAD_TAR)]
    # A restart hashes nothing again (the run directory remembers) and still leaves the shard out.
    rc, again = run_service(shards, out, *args)
    assert rc == 0 and "shards: 10 checked before (shard-checks.json), 1 bad, 0 left to check" in again.stdout
    assert "2 epoch(s) done" in again.stdout and "skipped" in again.stderr


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_with_every_shard_corrupt_is_one_line_not_a_traceback(sample_shards: Path, tmp_path: Path,
                                                                      split: str) -> None:
    """Skipping every corrupt shard left nothing: every val shard gave a ValueError traceback (exit 1,
    no exit file: a crash to restart), every train shard 'loader.batch_size 16 is more than the 0
    training images' (blaming the batch size)."""
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    tars = sorted((shards / split).glob("*.tar"))
    for tar in tars:
        flip_jpeg_bytes(tar)
    rc, service = run_service(shards, tmp_path / "run", "--epochs", "1", "--data.on_corrupt", "skip",
                              "--data.verify", "before", timeout=240)
    assert rc == 1 and "Traceback" not in service.stderr, service.stderr
    last = service.stderr.strip().splitlines()[-1]
    assert f"every {split} shard ({len(tars)} of {len(tars)}) differs from the manifest" in last, last
    assert "restore the shards from a copy or re-create them" in last and "batch_size" not in last, last


def _failed(port: int) -> float:
    """This rank's ``alexnet_samples_failed_total``, scraped."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        line = next(ln for ln in r.read().decode().splitlines() if ln.startswith("alexnet_samples_failed_total "))
    return float(line.split()[1])


@pytest.mark.slow
def test_two_ranks_count_and_say_a_skipped_shard_once(corrupt_shards, tmp_path: Path) -> None:
    """Rank 0's verdict reaches every rank, but the job left the shard's 20 samples out once: the
    dashboard's sum() over the ranks is 20, not 40, and the warning is one line, not one per rank."""
    shards, _ = corrupt_shards
    port = free_port(2)
    service = Service(shards, tmp_path / "run", "--epochs", "1", "--data.on_corrupt", "skip", "--data.verify",
                      "before", "--http.port", str(port), launcher=TORCHRUN_2)
    try:
        service.wait_for(r"epoch 1 step 1/3")
        counts = [_failed(port + local_rank) for local_rank in (0, 1)]
        assert service.wait() == 0, service.stderr
    finally:
        service.kill()
    assert counts == [20.0, 0.0], counts  # was [20.0, 20.0]: sum() 40
    assert service.stderr.count("sample(s) not used") == 1, service.stderr


@pytest.mark.slow
def test_a_rank_reading_a_copy_of_its_own_checks_that_copy(sample_shards: Path, corrupt_shards,
                                                           tmp_path: Path) -> None:
    """--shards may differ per rank (each node its own local copy).  Rank 0 reads intact shards,
    rank 1 a copy with a flipped JPEG: with ``data.verify before`` no rank trains, and the line
    names the damaged shard of rank 1's copy (rank 0 alone hashed its own files, and rank 1
    trained on the garbled pixels).  Every rank's line says to re-create rank 1's copy: rank 0's
    named its own intact shards (hours of sharding on ImageNet for nothing)."""
    copy, _ = corrupt_shards
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text(f'#!/bin/sh\n[ "$RANK" = 1 ] && exec {sys.executable} -m service "$@" --shards {copy}\n'
                       f'exec {sys.executable} -m service "$@"\n')
    wrapper.chmod(0o755)
    service = Service(sample_shards, tmp_path / "run", "--epochs", "1", "--data.verify", "before", "--http.port",
                      str(free_port(2)), launcher=(*TORCHRUN_2, "--no-python"), program=(str(wrapper),))
    try:
        service.wait(timeout=240)
    finally:
        service.kill()
    assert f"train shard {copy / 'train' / BAD_TAR}: contents differ from the manifest's sha256" in service.stderr, (
        service.stdout[-2000:] + service.stderr[-2000:])
    assert "epoch 1 step" not in service.stdout, service.stdout
    said = [line for line in service.errors if line.startswith("service: ")]
    assert len(said) == 2 and all(f"OUT={copy})" in line for line in said), said


def _check(shards: Path, out: Path, *args: str) -> tuple[ShardCheck, RunLog]:
    cfg = parse(["--shards", str(shards), "--out", str(out), *args])
    log = RunLog(out, console=False).open()
    metrics = ServiceMetrics(build_labels("cpu", "grouped", 1))
    return ShardCheck(cfg, contract.load(shards, splits=()), Ranks(), log, metrics), log


def test_checks_are_remembered_until_the_file_changes(sample_shards: Path, tmp_path: Path) -> None:
    shards, out = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(sample_shards, shards)
    for start in (1, 2):  # the first start hashes every shard, the second none
        check, log = _check(shards, out, "--data.verify", "before")
        assert check.prepare() == frozenset()
        log.close()
        assert [e["shards"] for e in events(out, "shard_check")] == [10], start
    tar = shards / "train" / BAD_TAR
    stat = tar.stat()
    flip_jpeg_bytes(tar)
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # mtime put back: the ctime still tells
    check, log = _check(shards, out, "--data.verify", "before")
    with pytest.raises(DataError, match=f"train shard {tar}: contents differ.*found before this start"):
        check.prepare()
    assert events(out, "shard_check")[-1]["shards"] == 1  # only the changed shard was hashed again


def test_background_check_stops_at_the_next_step_and_says_what_was_used(sample_shards: Path,
                                                                        tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    flip_jpeg_bytes(shards / "val" / "val-000001.tar")
    check, _ = _check(shards, tmp_path / "run")
    assert check.prepare() == frozenset()  # nothing known yet: training may start
    check.start(step=12)  # a resumed run
    with pytest.raises(DataError) as info:
        check.finish(step=15)
    message = str(info.value)
    assert "val shard" in message and "found by the background check at step 15" in message
    assert "validation data: no step trained on it" in message and "earlier starts (steps 1..12)" in message


def test_skip_needs_the_check_before_the_readers_are_built() -> None:
    with pytest.raises(ServiceError, match="data.on_corrupt skip needs data.verify before") as info:
        parse(["--data.on_corrupt", "skip"])
    assert info.value.code == 2
    with pytest.raises(ServiceError, match=r"data.verify must be one of \['background', 'before'\]"):
        parse(["--data.verify", "lazy"])
    assert TrainConfig().data.on_corrupt == "stop" and TrainConfig().data.verify == "background"


def test_a_loader_position_is_refused_for_another_list_of_tars(sample_shards: Path) -> None:
    """DALI itself would apply it to the shorter list without a word."""
    cfg = LoaderConfig(batch_size=24, threads=1)
    full = build_train_loader(sample_shards, config=cfg)
    batches = iter(full)
    next(batches)
    state = full.state_dict()
    fewer = build_train_loader(sample_shards, config=cfg, exclude={BAD_TAR})
    with pytest.raises(ValueError, match="tars"):
        fewer.load_state_dict(state)


def test_the_readers_first_shards_are_checked_first() -> None:
    assert reading_order(tuple(range(10)), 1) == list(range(10))
    assert reading_order(tuple(range(10)), 3) == [0, 4, 7, 1, 5, 8, 2, 6, 9, 3]  # shares 0-3, 4-6, 7-9


def test_the_check_s_rate_is_in_mb_per_second_when_below_a_tenth_of_a_gb() -> None:
    """The sample's 20 MB in 4.5 s read '0.00 GB/s'."""
    from service.shard_findings import done_line

    assert done_line(10, 0, 19_700_000, 4.5) == ("shards: 10 checked against the manifest, all intact "
                                                 "(19.7 MB in 4.5 s, 4.4 MB/s)")
    assert done_line(3, 1, 31_000_000_000, 19.0).endswith("(31.0 GB in 19 s, 1.63 GB/s)")


@pytest.mark.slow
@pytest.mark.parametrize("unreadable", ["train-000002.tar", "train-000002.idx"])
def test_a_shard_the_service_may_not_read_is_one_line_not_a_traceback(unreadable: str, sample_shards: Path,
                                                                      tmp_path: Path) -> None:
    """A shard (or its index) the service's user may not read (another user's, mode 600) ended the
    hash in a PermissionError traceback (``data.verify before``; in the background pass: a thread's
    traceback, and the check stopped silently).  Now it is the shard's finding, naming the file and
    the fix: the run stops on it, exit 1."""
    import subprocess

    from tests.service_proc import ROOT, TINY
    no_dac = "-dac_override,-dac_read_search"  # what lets root read any file
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    os.chmod(shards / "train" / unreadable, 0)
    launcher: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root reads any file; dropping that needs setpriv (util-linux)")
        launcher = ["setpriv", f"--bounding-set={no_dac}", f"--inh-caps={no_dac}"]
    for path in (tmp_path, *tmp_path.parents):  # pytest's directories are root's, mode 700
        if path == Path("/") or not path.is_relative_to("/tmp"):
            break
        os.chmod(path, path.stat().st_mode | 0o005)
    cmd = [*launcher, sys.executable, "-m", "service", "--shards", str(shards), "--out", str(tmp_path / "run"), *TINY,
           "--epochs", "1", "--data.verify", "before"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert f"train shard {shards / 'train' / 'train-000002.tar'}: " in line, line
    said = {"train-000002.tar": "the tar cannot be read (Permission denied) by uid ",
            "train-000002.idx": f"its index {shards / 'train' / unreadable} cannot be read (Permission denied)"}
    assert said[unreadable] in line and "re-create the shards" not in line, line
