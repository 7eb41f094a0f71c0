"""Settings changed between a stop and a restart: what the resumed run trains and records must
still be what the user asked for (real service processes on the sample shards)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.service_proc import Service, checkpoint_steps, events, run_service

pytestmark = pytest.mark.slow


def test_a_change_of_eval_views_restarts_the_schedules_wait_and_is_recorded(sample_shards: Path, tmp_path: Path) -> None:
    """Epoch 1 evaluated with 1 view, the restart with 10: the plateau schedule compared the
    10-view errors with the 1-view best (an lr drop, or none, for a change of measure alone) and
    history.json did not say which errors were which views."""
    out = tmp_path / "run"
    rc, first = run_service(sample_shards, out, "--epochs", "1")
    assert rc == 0, first.stderr
    # A restart that evaluates nothing more (its epochs done) has no schedule to tell of it
    rc, idle = run_service(sample_shards, out, "--epochs", "1", "--eval_views", "10")
    assert rc == 0 and "finished: 1 epoch(s)" in idle.stdout, idle.stderr
    assert "eval_views" not in idle.stderr and events(out, "eval_views_changed") == [], idle.stderr
    rc, second = run_service(sample_shards, out, "--epochs", "2", "--eval_views", "10")
    assert rc == 0, second.stderr
    assert "was evaluated with eval_views 1, this run with 10" in second.stderr, second.stderr
    assert [e["text"] for e in events(out, "eval_views_changed")] != []
    history = json.loads((out / "history.json").read_text())
    assert [r["eval_views"] for r in history] == [1, 10]
    newest = out / f"checkpoint-{checkpoint_steps(out)[-1]:09d}.pt"
    schedule = torch.load(newest, weights_only=True)["schedule"]
    # Epoch 2's 10-view error is the first of its measure: the best so far, no evaluation without one.
    assert (schedule["best"], schedule["evals_without_improvement"]) == (history[1]["top1_error"], 0)


def test_fewer_epochs_than_already_trained_says_where_the_run_stands(sample_shards: Path, tmp_path: Path) -> None:
    """Stopped in epoch 2, restarted with --epochs 1: it said 'finished: 1 epoch(s)' and no more,
    while its newest checkpoint (the one ``make predict`` uses) holds steps of epoch 2."""
    out = tmp_path / "run"
    service = Service(sample_shards, out, "--epochs", "2")
    assert service.stop_at(r"epoch 2 step 2/6") == 0, service.stderr
    rc, again = run_service(sample_shards, out, "--epochs", "1")
    assert rc == 0, again.stderr
    assert re.search(r"^finished: 1 epoch\(s\), \d+ steps, more than --epochs 1 asks: the run stands at epoch 2 "
                     r"step \d/6, which its newest checkpoint holds", again.stdout, re.M), again.stdout


def test_a_resume_from_an_older_checkpoint_rewrites_the_newer_history(sample_shards: Path, tmp_path: Path) -> None:
    """The newest checkpoint lost (deleted, or damaged and set aside): the run resumes the older
    one and trains its epoch again, but history.json and curve.png kept the lost epoch, and a
    stop before its evaluation left them showing an epoch no checkpoint holds."""
    out = tmp_path / "run"
    rc, first = run_service(sample_shards, out, "--epochs", "2")
    assert rc == 0, first.stderr
    (out / f"checkpoint-{checkpoint_steps(out)[-1]:09d}.pt").unlink()
    service = Service(sample_shards, out, "--epochs", "2")
    assert service.stop_at(r"epoch 2 step 2/6") == 0, service.stderr
    assert [r["epoch"] for r in json.loads((out / "history.json").read_text())] == [1]
    assert "history.json listed epoch(s) 1, 2" in service.stderr, service.stderr
