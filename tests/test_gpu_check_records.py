"""What ``make gpu-check`` records from its parts, without running them: the projection's rates
and where each came from, the files a part keeps, a service part cut off by the deadline (its
finished epochs, never an earlier run's)."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from bench.gpu_check import settle
from bench.gpu_check_parts import PARTS, Context, keep_files
from bench.gpu_parts import project


def part(name: str, **record):
    return dataclasses.replace(next(p for p in PARTS if p.name == name), record=record)


def test_the_projection_takes_each_rate_from_the_best_source_there_is() -> None:
    """Training from the service part's last epoch, evaluation from the sweep's projection (warm
    batches), else the service's own, else the sweep's fastest measured: the headline never drops
    the evaluation for want of a recommendation.  Without a service part, the sweep's projection."""
    def service(evaluation):
        return {"status": "ok", "results": {"epochs": [{"images_per_s": 20_000.0, "eval_views_per_s": evaluation}]}}

    swept = {"status": "ok", "results": {"projection": {"eval_views_per_s": 90_000.0, "train_hours": 1.0},
                                         "eval_views_per_s": 95_000.0}}
    unrecommended = {"status": "ok", "results": {"projection": None, "eval_views_per_s": 95_000.0}}
    p = project({"service": service(80_000.0), "sweep": swept})
    assert (p["eval_views_per_s"], p["eval_rate_from"], p["train_images_per_s"], p["service_eval_views_per_s"]) == (
        90_000.0, "sweep", 20_000.0, 80_000.0)
    p = project({"service": service(80_000.0), "sweep": unrecommended})
    assert (p["eval_views_per_s"], p["eval_rate_from"]) == (80_000.0, "service part, last epoch")
    p = project({"service": service(None), "sweep": unrecommended})
    assert (p["eval_views_per_s"], p["eval_rate_from"], p["includes_evaluation"]) == (
        95_000.0, "sweep, fastest measured", True)
    p = project({"service": service(None)})
    assert not p["includes_evaluation"] and p["eval_rate_from"] is None
    assert project({"service": {"status": "failed"}, "sweep": swept})["train_hours"] == 1.0
    assert project({"service": {"status": "failed"}, "sweep": unrecommended}) is None


def test_keeping_a_parts_files_leaves_a_part_that_keeps_none_alone(tmp_path: Path) -> None:
    """The sweep writes a file per configuration into OUT/sweep itself: keeping files for parts
    (the service part's log and curve, copied into OUT/service) must not clear it."""
    ctx = Context(tmp_path / "out", tmp_path / "data", dry=True, deadline=time.time() + 60)
    (ctx.out / "sweep").mkdir(parents=True)
    (ctx.out / "sweep" / "e2e.json").write_text("{}")
    assert keep_files(part("sweep"), ctx, time.time()) is None
    assert (ctx.out / "sweep" / "e2e.json").is_file()


def test_a_service_run_cut_off_keeps_the_epochs_it_finished(tmp_path: Path) -> None:
    """The deadline kills the service part in its third epoch: the part is failed, with the
    two epochs its run finished (its history, which ``--fresh`` started empty)."""
    ctx = Context(tmp_path / "out", tmp_path / "data", dry=True, deadline=time.time() + 60)
    run = ctx.data / "service-run"
    run.mkdir(parents=True)
    history = [{"epoch": e, "images_per_s": 100.0 * e, "data_share": 0.1, "eval_views_per_s": 900.0,
                "train_loss": 2.0, "top1_error": 0.5} for e in (1, 2)]
    (run / "history.json").write_text(json.dumps(history))
    (ctx.out / "logs").mkdir(parents=True)
    log = ctx.out / "logs" / "service.log"
    log.write_text("epoch 3 step 40/100\n")
    service = part("service", started=time.time() - 5)
    settle(service, ctx, log, "stopped by SIGTERM (the deadline)")
    assert service.record["status"] == "failed" and [e["epoch"] for e in service.record["results"]["epochs"]] == [1, 2]
    assert (ctx.out / "service" / "history.json").is_file()  # kept with the results, as after a finished run


def test_a_service_part_that_died_early_never_reports_an_earlier_runs_epochs(tmp_path: Path) -> None:
    """The service died before ``--fresh`` cleared the run directory (a flag it refused, a failed
    join): the history there is the last gpu-check's, and it must not pass for this run's."""
    ctx = Context(tmp_path / "out", tmp_path / "data", dry=True, deadline=time.time() + 60)
    run = ctx.data / "service-run"
    run.mkdir(parents=True)
    (run / "history.json").write_text(json.dumps([{"epoch": 1, "images_per_s": 1.0, "data_share": 0.1}]))
    old = ctx.started - 3600
    os.utime(run / "history.json", (old, old))
    (ctx.out / "logs").mkdir(parents=True)
    log = ctx.out / "logs" / "service.log"
    log.write_text("service: model.compile_mode must be one of ...\n")
    service = part("service", started=time.time() - 5)
    settle(service, ctx, log, "exit code 2")
    assert service.record["status"] == "failed" and "results" not in service.record
    with pytest.raises(RuntimeError, match="an earlier run's"):
        service.read(ctx, log.read_text())
