"""A stop during the shard check before training (``data.verify before``) is honoured at once:
at ImageNet's ~140 GB the check takes minutes, far beyond torchrun's 30 s between SIGTERM and
SIGKILL.  A real service process, a real SIGTERM, real shards: one training shard made 6 GiB
larger (a sparse tail of zeros after the tar's end-of-archive blocks, with the manifest's size
and sha256 to match), so hashing it takes seconds on any machine (one thread hashes one shard)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from service.app import parse
from service.shard_check import ShardCheck
from tests.service_proc import TINY, TORCHRUN_2, Service, checkpoint_steps, events, free_port

BIG = "train-000000.tar"
PAD = 6 << 30


def pad_shard(shards: Path) -> None:
    """Grow ``BIG`` by ``PAD`` zero bytes (sparse: no disk used) and record it in the manifest."""
    tar = shards / "train" / BIG
    digest = hashlib.sha256(tar.read_bytes())
    zeros = bytes(16 << 20)
    for _ in range(PAD // len(zeros)):
        digest.update(zeros)
    os.truncate(tar, tar.stat().st_size + PAD)
    path = shards / "manifest.json"
    record = json.loads(path.read_text())
    entry = next(s for s in record["splits"]["train"]["shards"] if s["tar"] == BIG)
    entry["bytes"], entry["sha256"] = tar.stat().st_size, digest.hexdigest()
    path.write_text(json.dumps(record, indent=1) + "\n")


def test_a_stop_during_the_check_before_training_ends_the_start_at_once(sample_shards: Path,
                                                                        tmp_path: Path) -> None:
    shards, out = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(sample_shards, shards)
    pad_shard(shards)
    service = Service(shards, out, "--epochs", "1", "--data.verify", "before")
    try:
        service.wait_for(r"shards: checking 10 shard\(s\), 6\.4 GB, against the manifest before training")
        signalled = time.monotonic()
        service.signal(signal.SIGTERM)
        rc = service.wait(timeout=120)
        took = time.monotonic() - signalled
    finally:
        service.kill()
    # was: the whole check, then the loaders and a step-0 checkpoint before the stop was seen
    assert rc == 0, service.stderr
    assert took < 30, took  # torchrun's grace before SIGKILL; here it is a block of the hash
    (line,) = service.stderr.strip().splitlines()
    assert line.startswith("service: stopped (SIGTERM) during the shard check before training (data.verify before), "
                           "after "), line
    assert "of 10 shard(s): nothing was trained or checkpointed; the check runs again at the next start" in line
    assert "Traceback" not in service.stderr and "train:" not in service.stdout  # no loader was built
    assert checkpoint_steps(out) == []
    remembered = json.loads((out / "shard-checks.json").read_text())["shards"] \
        if (out / "shard-checks.json").exists() else {}
    assert str(shards / "train" / BIG) not in remembered  # the next start hashes it again
    assert all(entry["problem"] is None for entry in remembered.values())  # a stop is not a finding
    (stopped,) = events(out, "shard_check_interrupted")
    assert stopped["reason"] == "SIGTERM" and stopped["of"] == 10 and stopped["shards"] == len(remembered) < 10


def _health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("launcher", [pytest.param((), id="one process"),
                                      pytest.param(TORCHRUN_2, id="two ranks", marks=pytest.mark.slow)])
def test_a_long_check_before_training_keeps_every_rank_healthy(sample_shards: Path, tmp_path: Path,
                                                               launcher: tuple[str, ...]) -> None:
    """``data.verify before`` on ImageNet hashes every shard before the first step: minutes, longer
    than ``http.stall_seconds`` (300 s) on slow storage.  /healthz said "stalled" for the whole
    check on the rank that hashed and on those waiting for its verdict, so the container turned
    unhealthy and the AlexNetStalled alert fired at a normal start.  Here the limit is 1 s and one
    shard takes seconds to hash: every rank must stay healthy while the check runs, and a rank
    that stops beating (a hung read) must still turn unhealthy, which the other tests cover."""
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    pad_shard(shards)
    port, ranks = free_port(2), 2 if launcher else 1
    service = Service(shards, tmp_path / "run", "--epochs", "1", "--data.verify", "before", "--http.stall_seconds", "1",
                      "--http.port", str(port), "--loader.shuffle_buffer", "16", launcher=launcher)
    try:
        service.wait_for(r"shards: checking 10 shard\(s\), 6\.4 GB, against the manifest before training")
        begun, answers = time.monotonic(), []
        while time.monotonic() - begun < 3 and "checked against the manifest" not in service.stdout:
            answers += [(rank, *_health(port + rank)) for rank in range(ranks)]
            time.sleep(0.25)
        checking = time.monotonic() - begun
    finally:
        service.kill()
    assert checking > 1.5, f"the check took {checking:.1f} s, too short to outlast the 1 s limit: pad more"
    assert {rank for rank, *_ in answers} == set(range(ranks))
    assert all(code == 200 for _, code, _ in answers), answers


@pytest.mark.slow
def test_a_stopped_run_s_line_comes_after_the_background_check_s(sample_shards: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capfd: pytest.CaptureFixture) -> None:
    """A stop while the background check (``data.verify background``) hashes its last shard: the
    run said ``stopped (SIGTERM) at step N ...`` and only then halted the check, whose pass could
    end in between and print its ``shards: ... checked`` line (and its ``shard_check`` event) after
    the stop's, the run's last word.  Made deterministic in this process: the check's thread, done
    hashing, sends the SIGTERM itself and says its line only once it is told to halt, as when
    its last hash ends at that moment.  Its line must come first; the stop's stays the last."""
    import threading

    from service.app import run_service

    said_done = ShardCheck._say_done

    def done_as_the_stop_comes(check: ShardCheck, *args, **kwargs) -> None:
        if threading.current_thread().name == "shard-check":
            os.kill(os.getpid(), signal.SIGTERM)
            assert check._halt.wait(120), "the stopped run never halted the background check"
        said_done(check, *args, **kwargs)

    monkeypatch.setattr(ShardCheck, "_say_done", done_as_the_stop_comes)
    out = tmp_path / "run"
    assert run_service(parse(["--shards", str(sample_shards), "--out", str(out), *TINY, "--epochs", "50"])) == 0
    for thread in threading.enumerate():
        if thread.name == "shard-check":
            thread.join()
    lines = capfd.readouterr().out.strip().splitlines()
    assert any(" checked against the manifest" in line for line in lines), lines
    assert lines[-1].startswith("stopped (SIGTERM) at step "), lines[-3:]
    assert [e["event"] for e in events(out)][-2:] == ["shard_check", "stopped"], events(out)[-3:]
