"""A longer run (slow, but in CI): five epochs with 10-view evaluation and one restart in the middle
(SIGTERM as epoch 2's evaluation starts: the restart evaluates epoch 2 first, then trains on).

Memory bound: the restarted process's resident set (RSS) after its last epoch (5) is at most 20%
above the one after the first epoch it trained (3; its epoch 2 was only the pending evaluation,
before any gradient buffers existed).  Both are measured after the epoch's checkpoint copy, whose
host buffers are allocated once.  Measured here over 10-epoch runs: ~2.0-2.3 GB, wandering
by up to ~10% from epoch to epoch (allocator and DALI buffers) with no trend after the second
epoch; a step that kept its autograd graph alive would add hundreds of MB per step."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.service_proc import Service, events

RSS_BOUND = 1.2  # last / first


@pytest.mark.slow
def test_soak_five_epochs_with_a_restart(sample_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("--epochs", "5", "--eval_views", "10", "--log_every", "3")
    first = Service(sample_shards, out, *args)
    first.wait_for(r"epoch 2 step 6/6")
    first.signal()
    assert first.wait() == 0, first.stderr
    second = Service(sample_shards, out, *args)
    assert second.wait() == 0, second.stderr
    assert "1 epoch(s) done, epoch 2 trained, its evaluation pending (step 12 in all)" in second.stdout
    assert "finished: 5 epoch(s), 30 steps" in second.stdout and "epoch 2 step" not in second.stdout

    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert all(0 <= h["top5_error"] <= h["top1_error"] <= 1 and h["train_loss"] > 0 for h in history)
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    evals = events(out, "eval")
    assert [e["epoch"] for e in evals] == [1, 2, 3, 4, 5]
    first, last = evals[2]["rss_bytes"], evals[4]["rss_bytes"]  # epochs 3 and 5, both in the second process
    assert last < RSS_BOUND * first, f"RSS {first / 2**20:.0f} MB after epoch 3, {last / 2**20:.0f} MB after epoch 5"
    assert len({e["run_id"] for e in events(out, "start")}) == 1  # one run, resumed
