"""The gauges that say where the loop stands (heartbeat, learning rate, epoch), scraped from a real
service process from its first line to its exit: a dashboard reads them at every start, during
evaluations and checkpoints, not only between training steps."""
from __future__ import annotations

import json
import math
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from shards import manifest
from tests.service_proc import STEPS_PER_EPOCH, Service, run_service

pytestmark = pytest.mark.slow
GAUGES = ("alexnet_heartbeat_timestamp_seconds", "alexnet_learning_rate", "alexnet_epoch", "alexnet_train_steps_total",
          "alexnet_chance_loss", "alexnet_previous_exit_code")


def _gauges(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {name: float(value) for name, _, value in (ln.partition(" ") for ln in lines) if name in GAUGES}


def _observe(url: str) -> tuple[float, dict, dict[str, float], bool]:
    """(unix time before the requests, /status, the GAUGES from /metrics read after it, whether
    epoch and lr read the same before /status too: /status then saw the values the gauges show)."""
    before = time.time()
    earlier = _gauges(url)
    with urllib.request.urlopen(url + "/status", timeout=10) as r:
        status = json.load(r)
    values = _gauges(url)
    steady = all(str(earlier[k]) == str(values[k]) for k in ("alexnet_epoch", "alexnet_learning_rate"))
    return before, status, values, steady


def _watch(service: Service) -> list[tuple[float, dict, dict[str, float], bool]]:
    """Every observation from the endpoint's first line until it closes (the run ended)."""
    url, seen = service.url(), []
    while True:
        try:
            seen.append(_observe(url))
        except OSError:  # the endpoint closed: the run is over
            return seen
        time.sleep(0.02)


def test_heartbeat_lr_and_epoch_are_right_from_the_first_scrape_of_a_resumed_run(sample_shards: Path,
                                                                                 tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc, first = run_service(sample_shards, out, "--epochs", "1")
    assert rc == 0, first.stderr
    lr = json.loads((out / "history.json").read_text())[-1]["lr"]
    # No log line (the other writer of lr) before the epoch's last step: what lr says until then is the start's.
    # As docker/entrypoint.sh restarts a crash: the code it saw (an OOM kill's) on every scrape.
    service = Service(sample_shards, out, "--epochs", "2", "--log_every", "100", env={"ALEXNET_PREVIOUS_EXIT": "137"})
    try:
        seen = _watch(service)
        assert service.wait() == 0, service.stderr
    finally:
        service.kill()
    assert "resuming run" in service.stdout
    for before, status, m, _ in seen:
        # One heartbeat: the metric is never older than the beat /status (and /healthz) judge by;
        # was 0 until the first step, and a step's time through evaluations and checkpoints.
        assert m["alexnet_heartbeat_timestamp_seconds"] >= before - status["heartbeat_age_seconds"] - 0.1, (status, m)
        # Unknown (NaN) until the checkpoint is read, then epoch 2 at the checkpoint's lr; never 0.
        assert math.isnan(m["alexnet_epoch"]) or m["alexnet_epoch"] == 2, m
        assert math.isnan(m["alexnet_learning_rate"]) or m["alexnet_learning_rate"] == pytest.approx(lr), m
    # What AlexNetNotLearning compares the loss with: the training labels' entropy (ln(6) here), known from the start.
    counts = manifest.read(sample_shards).splits["train"].class_counts
    chance = -sum(n / sum(counts) * math.log(n / sum(counts)) for n in counts)
    assert chance == pytest.approx(math.log(6), abs=0.01)
    trained = [m for _, _, m, _ in seen if m["alexnet_train_steps_total"] > 0]
    assert trained and all(m["alexnet_chance_loss"] == pytest.approx(chance) for m in trained), trained
    assert all(m["alexnet_previous_exit_code"] == 137 for _, _, m, _ in seen)
    phases = {status["phase"] for _, status, _, _ in seen}
    assert {"starting", "training"} <= phases, phases
    mid_epoch = [m for _, _, m, _ in seen if 0 < m["alexnet_train_steps_total"] < STEPS_PER_EPOCH]
    assert mid_epoch and all(m["alexnet_learning_rate"] == pytest.approx(lr) for m in mid_epoch), mid_epoch


def test_status_and_gauges_agree_through_a_pending_evaluation_and_an_lr_drop(sample_shards: Path,
                                                                             tmp_path: Path) -> None:
    """/status said epoch 2 while the gauge said 1 (the pending evaluation of epoch 1) and had no lr
    until the first log line; after an lr drop both kept the old rate until the next log line (a
    whole epoch at log_every 100).  An lr of 1e-12 leaves float32 weights unchanged: epoch 2's
    error equals epoch 1's, so patience 1 lowers it to 1e-13 after epoch 2's evaluation."""
    # Stopped at the last step's line: after the epoch's last step and during its evaluation (10
    # views: long enough for the stop to land in it), both stop with the evaluation pending.  At
    # step 5's line the stop could land at step 5 itself (a mid-epoch stop, then step 6 trained at
    # the resume): the test failed in CI and in a full run.
    out, recipe = tmp_path / "run", ("--epochs", "3", "--optim.lr", "1e-12", "--optim.patience", "1",
                                     "--eval_views", "10")
    first = Service(sample_shards, out, *recipe)
    assert first.stop_at(r"epoch 1 step 6/6") == 0, first.stderr
    assert "epoch 1 trained, its evaluation pending" in first.stdout, first.stdout
    service = Service(sample_shards, out, *recipe, "--log_every", "100")
    try:
        seen = _watch(service)
        assert service.wait() == 0, service.stderr
    finally:
        service.kill()
    assert "epoch 1 trained, its evaluation pending" in service.stdout and "lr -> 1e-13" in service.stdout
    known = [(status, m) for _, status, m, steady in seen if steady and not math.isnan(m["alexnet_epoch"])]
    assert known and all(status["epoch"] == m["alexnet_epoch"] and status["lr"] == m["alexnet_learning_rate"]
                         for status, m in known), known
    assert {s["phase"] for s, _ in known if s["epoch"] == 1} >= {"evaluating"}
    # This process trains epochs 2 and 3 (steps 1-12); epoch 3 at the dropped rate from its first step.
    epoch3 = [m for _, m in known if 6 < m["alexnet_train_steps_total"] < 12]
    assert epoch3 and all(m["alexnet_learning_rate"] == pytest.approx(1e-13) for m in epoch3), epoch3


def _series(url: str, name: str) -> float | None:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        found = [ln.split()[-1] for ln in r.read().decode().splitlines() if ln.startswith(name + " ")]
    return float(found[0]) if found else None


def test_the_run_directorys_free_space_and_the_checkpoint_size_are_exported(
        sample_shards: Path, tmp_path: Path) -> None:
    """There was no disk metric at all: a run directory filling up showed nothing until the
    checkpoint write failed and the run stopped (exit 4).  The free space, read at each scrape, and
    the newest checkpoint's size, from the first scrape of a resumed run on, let AlexNetDiskLow warn
    while there is still room for one."""
    out = tmp_path / "run"
    first = Service(sample_shards, out, "--epochs", "2")
    try:
        url = first.url()
        written = Path(first.wait_for(r"\bcheckpoint (/\S+) \(").group(1))
        size, free = written.stat().st_size, shutil.disk_usage(out).free
        assert _series(url, "alexnet_checkpoint_size_bytes") == size
        # Others write on this disk too: a megabyte either way.
        assert abs(_series(url, "alexnet_run_dir_free_bytes") - free) < 2 ** 20 + size, free
        first.signal()
        assert first.wait(timeout=120) == 0, first.stderr
    finally:
        first.kill()
    resumed = Service(sample_shards, out, "--epochs", "2", "--log_every", "100")
    try:
        url = resumed.url()
        resumed.wait_for("resuming run")
        newest = max(out.glob("checkpoint-*.pt"), key=lambda p: p.stat().st_mtime)
        # The same model and optimizer: every checkpoint of the run is within a few kilobytes of the others.
        assert _series(url, "alexnet_checkpoint_size_bytes") == pytest.approx(newest.stat().st_size, rel=0.01)
        resumed.signal()
        assert resumed.wait(timeout=120) == 0, resumed.stderr
    finally:
        resumed.kill()
