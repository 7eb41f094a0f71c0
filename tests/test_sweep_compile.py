"""``bench.sweep_compile``: the children that compile graphs ahead, side by side, for real (on the
CPU, with configurations that compile nothing: what is tested is the running of the children,
their results and the time limit; ``tests/test_sweep_plan.py`` tests what the sweep does with them)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.sweep_compile import compile_many
from bench.sweep_configs import DRY, Config

EAGER = Config("model: eager, tiny", "model", ("--model.compile", "off", *DRY), 60, eval=True)


@pytest.mark.slow
def test_children_side_by_side_report_each_result(sample_shards: Path, tmp_path: Path) -> None:
    (tmp_path / "sweep").mkdir(), (tmp_path / "logs" / "sweep").mkdir(parents=True)
    bad = Config("model: a setting that does not exist", "model", ("--model.warp", "9", *DRY), 60)
    results = compile_many([EAGER, bad], sample_shards, tmp_path, limit=240)
    assert results[EAGER.name]["status"] == "ok", results
    done = json.loads((tmp_path / "sweep" / "compile-model-eager-tiny.json").read_text())
    assert done["images_per_s"] > 0 and done["eval_views_per_s"] > 0  # one step and one evaluation batch ran
    assert results[bad.name]["status"] == "failed" and "unknown key 'model.warp'" in results[bad.name]["error"]


@pytest.mark.slow
def test_what_the_limit_cuts_off_is_failed_or_not_started(sample_shards: Path, tmp_path: Path) -> None:
    (tmp_path / "sweep").mkdir(), (tmp_path / "logs" / "sweep").mkdir(parents=True)
    many = [Config(f"model: eager {i}", "model", EAGER.flags, 60) for i in range(8)]
    # 3 s: less than any child needs to import torch and DALI and build the model, and 2 s to start
    # all six (no child starts in the last second; a loaded 2-core machine once started 5 in 1 s)
    results = compile_many(many, sample_shards, tmp_path, limit=3)
    started = [r for r in results.values() if r["status"] != "not started"]
    assert len(started) == 6 and all(r["status"] == "failed" and r["error"].startswith("timed out") for r in started)
    assert max(r["wall_seconds"] for r in started) < 5  # all killed at the limit, at once
    assert [results[c.name]["status"] for c in many[6:]] == ["not started"] * 2


@pytest.mark.slow
def test_the_first_may_compile_on_after_the_others_are_cut_off(sample_shards: Path, tmp_path: Path) -> None:
    """The first configuration (the model the sweep runs next) has its own, later limit: it
    finishes while the others, cut off at the common limit, are killed at once."""
    (tmp_path / "sweep").mkdir(), (tmp_path / "logs" / "sweep").mkdir(parents=True)
    many = [EAGER] + [Config(f"model: eager {i}", "model", EAGER.flags, 60) for i in range(2)]
    results = compile_many(many, sample_shards, tmp_path, limit=2, first_limit=240)
    assert results[EAGER.name]["status"] == "ok" and results[EAGER.name]["wall_seconds"] > 2, results
    assert all(results[c.name]["status"] == "failed" and results[c.name]["error"].startswith("timed out")
               for c in many[1:])
