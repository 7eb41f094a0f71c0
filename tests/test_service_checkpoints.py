"""Checkpoints a restart cannot simply resume, as real service processes: every one unreadable,
another format version, RNG states of devices this machine does not have, a pickle that would
run code, a full disk (a real tmpfs), and the bound on ``*.corrupt`` files."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from service import checkpoint as ckpt
from service.checkpoint_crc import checksum
from tests.mounts import tmpfs
from tests.service_proc import ROOT, TINY, Service, checkpoint_steps, run_service
from tests.test_service_failures import _copy_run, finished_run  # noqa: F401 (a fixture: checkpoints 2, 4, 6)


def _rewrite(path: Path, change) -> None:
    """Load a checkpoint, ``change`` its payload in place, save it with a matching CRC."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    payload["crc32"] = checksum(payload)
    torch.save(payload, path)


@pytest.mark.slow
def test_every_checkpoint_unreadable_is_refused_unless_fresh(finished_run: Path, sample_shards: Path,
                                                             tmp_path: Path) -> None:
    out = _copy_run(finished_run, tmp_path)
    for step in (2, 4, 6):
        path = ckpt.path_for(out, step)
        path.write_bytes(path.read_bytes()[:1000])  # truncated
    rc, service = run_service(sample_shards, out, "--epochs", "1", timeout=180)
    assert rc == 2 and "Traceback" not in service.stderr and "new run" not in service.stdout
    assert f"no checkpoint in {out} can be read" in service.stderr and "--fresh true" in service.stderr
    assert all(f"checkpoint-00000000{s}.pt (" in service.stderr for s in (2, 4, 6))
    assert checkpoint_steps(out) == [2, 4, 6] and not list(out.glob("*.corrupt"))  # nothing renamed

    fresh = Service(sample_shards, out, "--epochs", "1", "--fresh", "true")
    try:
        fresh.wait_for(r"fresh start: deleted \d+ file")
        fresh.wait_for(r"new run ")
    finally:
        fresh.kill()


# Root reads any file: these capabilities are what make a permission refuse it (setpriv drops them).
NO_DAC = "-dac_override,-dac_read_search"


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_read_is_refused_not_set_aside(finished_run: Path, sample_shards: Path,
                                                                   tmp_path: Path) -> None:
    """A sound newest checkpoint the service may not read (another user's, mode 600) is no
    damage: renaming it and resuming an older one would silently lose its progress."""
    out = _copy_run(finished_run, tmp_path)
    newest = ckpt.path_for(out, 6)
    os.chmod(newest, 0o600)
    launcher: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root reads any file; dropping that needs setpriv (util-linux)")
        os.chown(newest, 65534, 65534)  # nobody's
        launcher = ["setpriv", f"--bounding-set={NO_DAC}", f"--inh-caps={NO_DAC}"]
    else:
        os.chmod(newest, 0)
    cmd = [*launcher, sys.executable, "-m", "service", "--shards", str(sample_shards), "--out", str(out), *TINY,
           "--epochs", "1"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"service: checkpoint {newest} cannot be read (Permission denied) by uid "), line
    assert "nothing was changed" in line and "resuming" not in done.stdout
    assert checkpoint_steps(out) == [2, 4, 6] and not list(out.glob("*.corrupt"))  # nothing set aside


@pytest.mark.slow
def test_a_checkpoint_of_another_format_version_is_refused_naming_both(finished_run: Path, sample_shards: Path,
                                                                       tmp_path: Path) -> None:
    out = _copy_run(finished_run, tmp_path)
    newest = ckpt.path_for(out, 6)
    _rewrite(newest, lambda p: p.update(version=ckpt.VERSION + 1))
    rc, service = run_service(sample_shards, out, "--epochs", "1", timeout=180)
    assert rc == 2 and "Traceback" not in service.stderr and "resuming" not in service.stdout
    assert f"{newest} has checkpoint format version {ckpt.VERSION + 1}; this code reads version {ckpt.VERSION}" \
        in service.stderr and "the newer version of the service" in service.stderr
    assert checkpoint_steps(out) == [2, 4, 6] and not list(out.glob("*.corrupt"))  # not mistaken for damage


@pytest.mark.slow
def test_rng_states_of_absent_gpus_are_reported_not_fatal(finished_run: Path, sample_shards: Path,
                                                          tmp_path: Path) -> None:
    """A version-1 checkpoint written on two GPUs (one CUDA state per visible GPU, by position)
    resumed here, without them: upgraded, the CPU state restored, the GPU states named as unused."""
    out = _copy_run(finished_run, tmp_path)
    cuda_state = torch.zeros(16, dtype=torch.uint8)  # the Philox generator's seed + offset

    def as_version_1_on_two_gpus(payload: dict) -> None:
        payload["version"] = 1
        for rng in payload["rng"]:
            rng["cuda"] = [cuda_state, cuda_state.clone()]

    _rewrite(ckpt.path_for(out, 6), as_version_1_on_two_gpus)
    rc, service = run_service(sample_shards, out, "--epochs", "1", timeout=180)
    assert rc == 0 and "Traceback" not in service.stderr, service.stderr
    assert "resuming run" in service.stdout and "finished: 1 epoch(s)" in service.stdout
    assert ("rank 0: random state restored for the CPU; not used: the saved state of cuda:0, cuda:1 "
            "(this run uses the CPU only)") in service.stderr


@pytest.mark.slow
def test_a_pickle_that_would_run_code_is_set_aside_without_torchs_advice(finished_run: Path, sample_shards: Path,
                                                                         tmp_path: Path) -> None:
    out = _copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    evil = ckpt.path_for(out, 8)
    subprocess.run([sys.executable, "-c", f"""
import os, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
torch.save({{"format": "{ckpt.FORMAT}", "evil": Evil()}}, "{evil}")
"""], check=True)
    rc, service = run_service(sample_shards, out, "--epochs", "1", timeout=180)
    assert rc == 0 and not marker.exists(), service.stderr  # never unpickled
    assert f"checkpoint {evil} is unreadable (it names the Python object posix.system" in service.stderr
    assert "weights_only" not in service.stderr and "Re-running" not in service.stderr
    assert "from " + str(ckpt.path_for(out, 6)) in service.stdout


def test_corrupt_checkpoints_are_bounded(tmp_path: Path) -> None:
    """A flapping disk must not fill the volume with 455 MB ``*.corrupt`` files."""
    for step in (1, 2, 3):
        (tmp_path / f"checkpoint-00000000{step}.pt.corrupt").write_bytes(b"old")
    payload = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "run_id": "r", "config": {}, "identity": {},
               "progress": {"step": 4}, "model": {}, "velocity": {}, "schedule": {}, "loaders": [], "rng": [],
               "lr_scale": 1.0}
    payload["crc32"] = checksum(payload)
    ckpt.atomic_save(payload, ckpt.path_for(tmp_path, 4))
    ckpt.path_for(tmp_path, 5).write_bytes(b"not a zip")
    said: list[str] = []
    path, _ = ckpt.newest_valid(tmp_path, said.append)
    assert path.name == "checkpoint-000000004.pt"
    kept = sorted(p.name for p in tmp_path.glob("*.corrupt"))
    assert len(kept) == ckpt.KEEP_CORRUPT and kept[-1] == "checkpoint-000000005.pt.corrupt"
    assert any(f"only the newest {ckpt.KEEP_CORRUPT} unreadable checkpoints are kept" in line for line in said)


def test_a_version_1_checkpoint_is_upgraded(tmp_path: Path) -> None:
    payload = {"format": ckpt.FORMAT, "version": 1, "run_id": "r", "config": {}, "identity": {},
               "progress": {"step": 4}, "model": {}, "velocity": {}, "schedule": {}, "loaders": [{}],
               "rng": [{"torch": torch.zeros(3, dtype=torch.uint8), "cuda": [torch.ones(16, dtype=torch.uint8)]}],
               "lr_scale": 1.0}
    payload["crc32"] = checksum(payload)
    ckpt.atomic_save(payload, ckpt.path_for(tmp_path, 4))
    loaded = ckpt.load(ckpt.path_for(tmp_path, 4))
    assert loaded["version"] == ckpt.VERSION and list(loaded["rng"][0]["cuda"]) == ["cuda:0"]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 700 MB tmpfs: room for one 455 MB checkpoint, not for a second next to it."""
    with tmpfs(tmp_path / "disk", "size=700m") as mount:
        yield mount


@pytest.mark.slow
def test_a_full_disk_says_so_and_keeps_the_older_checkpoints(small_disk: Path, sample_shards: Path) -> None:
    out = small_disk / "run"
    rc, service = run_service(sample_shards, out, "--epochs", "1", "--checkpoint.every_steps", "2", timeout=240)
    assert rc == 4 and "Traceback" not in service.stderr, service.stderr
    line = next(line for line in service.stderr.splitlines() if line.startswith("service: "))
    assert line.startswith(f"service: writing a checkpoint in {out} failed: the disk is full: "
                           "checkpoint-000000004.pt needs about 455 MB, "), line
    assert "MB are free; the older checkpoints are intact (checkpoint-000000002.pt)" in line
    assert "inline_container" not in service.stderr
    assert checkpoint_steps(out) == [2] and ckpt.load(ckpt.path_for(out, 2))["progress"]["step"] == 2
    assert not list(out.glob(".checkpoint-*.tmp"))


def _fill(disk: Path) -> None:
    """Write a file until the disk is full (ENOSPC)."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(1 << 16))
        except OSError:
            pass
        with pytest.raises(OSError):
            f.write(bytes(4096))


def _wait_for_event(log: Path, event: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while f'"event": "{event}"' not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, f"no {event} event in {log}"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["start", "training", "ids"])
def test_a_full_disk_under_the_logs_says_so_as_for_a_checkpoint(when: str, sample_shards: Path, tmp_path: Path) -> None:
    """A full disk hit by a log write (at start, log.jsonl while training, or the ids.jsonl of
    ``--debug.ids``) was an OSError traceback and exit 1; now it is said as a checkpoint write on
    a full disk is (exit 4)."""
    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        out = disk / "run"
        out.mkdir()
        if when == "start":
            _fill(disk)
        # batch 8: 18 steps per epoch, so the train events after the fill need a new page of the
        # log before the epoch's end (about 270 bytes each; tmpfs allocates 4 kB pages)
        # ids.jsonl is created at the first step: filled after the start event (and config.json)
        # and before that step, the disk has no page for it
        ids = ("--debug.ids", "true") if when == "ids" else ()
        service = Service(sample_shards, out, "--epochs", "50", "--loader.batch_size", "8", *ids)
        try:
            if when == "ids":
                _wait_for_event(out / "log.jsonl", "start")
            if when != "start":
                if when == "training":
                    service.wait_for(r"epoch 1 step 1/18")
                _fill(disk)
            rc = service.wait(timeout=240)
        finally:
            service.kill()
        assert rc == 4 and "Traceback" not in service.stderr, service.stderr
        (line,) = [line for line in service.stderr.splitlines() if line.startswith("service: writing ")]
        # at start: config.json, the first write (log.jsonl named too, should an event come first)
        named = {"start": r"(config\.json|log\.jsonl)", "training": r"(log\.jsonl)", "ids": r"(ids\.jsonl)"}[when]
        assert re.match(rf"service: writing {re.escape(str(out))}/{named} failed: the disk is full: \1 needs about ",
                        line), line
        assert "bytes are free; there is no older checkpoint. Free some space" in line
        assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_a_start_that_fails_on_a_full_disk_never_begins_the_background_check(sample_shards: Path, tmp_path: Path,
                                                                             capfd: pytest.CaptureFixture) -> None:
    """The background shard check began before the start's last writes (its lines, config.json,
    the start event); one of those failing on a full disk ended the start without stopping it, and
    the process exited with the check's thread mid-write: ``.shard-checks.json.tmp`` was left
    behind (CI of stop 31, the test above, ``start``).  It now begins once the start is complete.
    In this process, so the thread can be waited for: it never hashes, it says nothing."""
    import threading

    from service.app import parse, run_service
    from service.errors import ServiceError

    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        out = disk / "run"
        out.mkdir()
        _fill(disk)
        cfg = parse(["--shards", str(sample_shards), "--out", str(out), *TINY, "--epochs", "50"])
        with pytest.raises(ServiceError, match="the disk is full") as info:
            run_service(cfg)
        for thread in threading.enumerate():
            if thread.name == "shard-check":
                thread.join()
        said = capfd.readouterr()
        assert info.value.code == 4 and "checked against the manifest" not in said.out, said.out
        assert "shard-checks.json" not in said.err and not list(out.glob(".*.tmp")), said.err
