"""Settings changed between a stop and a restart: what the resumed run trains and records must
still be what the user asked for (real service processes on the sample shards)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.service_proc import checkpoint_steps, events, run_service

pytestmark = pytest.mark.slow


def test_a_change_of_eval_views_restarts_the_schedules_wait_and_is_recorded(sample_shards: Path, tmp_path: Path) -> None:
    """Epoch 1 evaluated with 1 view, the restart with 10: the plateau schedule compared the
    10-view errors with the 1-view best (an lr drop, or none, for a change of measure alone) and
    history.json did not say which errors were which views."""
    out = tmp_path / "run"
    rc, first = run_service(sample_shards, out, "--epochs", "1")
    assert rc == 0, first.stderr
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
