"""The training loop the demo runs: timing, config handling, and a short real run (``python -m service.train``,
the alias of ``python -m service``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from service.metric_logger import StepTimer
from tests.conftest import ROOT, run_module


def test_step_timer_separates_data_wait_from_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock the test advances (not time.sleep against the wall clock: on a loaded 2-core
    machine four 50 ms sleeps took over 240 ms, and data_seconds missed 0.2 +- 0.04)."""
    from types import SimpleNamespace

    from service import metric_logger

    clock = [100.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    monkeypatch.setattr(metric_logger, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def slow_batches():
        for i in range(4):
            sleep(0.05)  # the loader is slow...
            yield i

    timer = StepTimer()
    for _ in timer.iterate(slow_batches(), lambda b: 8):
        sleep(0.02)  # ...and the step is fast
    w = timer.window(lambda: None)
    assert (w.steps, w.images) == (4, 32)
    assert w.data_seconds == pytest.approx(0.2)
    assert w.seconds == pytest.approx(0.28)
    assert w.data_share == pytest.approx(0.2 / 0.28)
    assert timer.window(lambda: None).steps == 0  # each window starts afresh


@pytest.mark.slow
def test_bad_settings_and_bad_shards_fail_early(tmp_path: Path) -> None:
    unknown = run_module("service.train", "--optim.learning_rate", "0.1", check=False)
    assert unknown.returncode == 2 and "unknown key 'optim.learning_rate'" in unknown.stderr
    missing = run_module("service.train", "--shards", str(tmp_path), "--out", str(tmp_path / "run"),
                         "--http.port", "0", check=False)
    assert missing.returncode == 1 and "make shards" in missing.stderr and "manifest.json" in missing.stderr


@pytest.mark.slow
def test_one_epoch_writes_history_and_curve(sample_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Given relative to where it starts (as make demo gives data/shards and runs/demo), recorded absolute.
    result = run_module("service.train", "--shards", os.path.relpath(sample_shards, ROOT),
                        "--out", os.path.relpath(out, ROOT), "--epochs", "1",
                        "--loader.batch_size", "24", "--log_every", "2", "--eval_views", "10",
                        "--model.bias_init", "0.1", "--http.port", "0", timeout=600)
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and history[0]["epoch"] == 1 and history[0]["lr"] == 0.01
    h = history[0]
    assert 0 < h["train_loss"] < 10 and 0 <= h["top5_error"] <= h["top1_error"] <= 1
    assert h["images_per_s"] > 0 and 0 <= h["data_share"] <= 1
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["loader"]["batch_size"] == 24
    # A relative path meant nothing once read from elsewhere (predict from another directory).
    assert (config["shards"], config["out"]) == (str(sample_shards), str(out))
    (checkpoint,) = out.glob("checkpoint-*.pt")
    assert torch.load(checkpoint, weights_only=True)["config"]["out"] == str(out)
    # 144 training images at batch 24: six logged steps, the last one at 6/6.
    assert "step 6/6" in result.stdout and "10-view" in result.stdout
