"""The gauges that say where the loop stands (heartbeat, learning rate, epoch), scraped from a real
service process from its first line to its exit: a dashboard reads them at every start, during
evaluations and checkpoints, not only between training steps."""
from __future__ import annotations

import json
import math
import time
import urllib.request
from pathlib import Path

import pytest

from tests.service_proc import STEPS_PER_EPOCH, Service, run_service

pytestmark = pytest.mark.slow
GAUGES = ("alexnet_heartbeat_timestamp_seconds", "alexnet_learning_rate", "alexnet_epoch", "alexnet_train_steps_total")


def _observe(url: str) -> tuple[float, dict, dict[str, float]]:
    """(unix time before both requests, /status, the GAUGES from /metrics read after it)."""
    before = time.time()
    with urllib.request.urlopen(url + "/status", timeout=10) as r:
        status = json.load(r)
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    values = {name: float(value) for name, _, value in (ln.partition(" ") for ln in lines) if name in GAUGES}
    return before, status, values


def _watch(service: Service) -> list[tuple[float, dict, dict[str, float]]]:
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
    service = Service(sample_shards, out, "--epochs", "2", "--log_every", "100")
    try:
        seen = _watch(service)
        assert service.wait() == 0, service.stderr
    finally:
        service.kill()
    assert "resuming run" in service.stdout
    for before, status, m in seen:
        # One heartbeat: the metric is never older than the beat /status (and /healthz) judge by;
        # was 0 until the first step, and a step's time through evaluations and checkpoints.
        assert m["alexnet_heartbeat_timestamp_seconds"] >= before - status["heartbeat_age_seconds"] - 0.1, (status, m)
        # Unknown (NaN) until the checkpoint is read, then epoch 2 at the checkpoint's lr; never 0.
        assert math.isnan(m["alexnet_epoch"]) or m["alexnet_epoch"] == 2, m
        assert math.isnan(m["alexnet_learning_rate"]) or m["alexnet_learning_rate"] == pytest.approx(lr), m
    phases = {status["phase"] for _, status, _ in seen}
    assert {"starting", "training"} <= phases, phases
    mid_epoch = [m for _, _, m in seen if 0 < m["alexnet_train_steps_total"] < STEPS_PER_EPOCH]
    assert mid_epoch and all(m["alexnet_learning_rate"] == pytest.approx(lr) for m in mid_epoch), mid_epoch
