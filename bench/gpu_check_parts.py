"""``make gpu-check``'s parts (``bench.gpu_check`` runs them): for each, its commands, its time
limit, what it needs, and how its output is read.  The measuring itself happens in the commands'
own processes (``bench.gpu_parts``, ``bench.bench_model``, ``bench.bench_pipeline``, ``bench.sweep``,
``python -m service``)."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from bench import gpu_parts
from bench.child import ROOT


@dataclass
class Context:
    out: Path
    data: Path
    dry: bool
    deadline: float
    python: str = sys.executable
    only: tuple[str, ...] = ()  # --parts: run these, skip the others
    env: dict[str, str] = field(default_factory=dict)  # for every part's process
    service_flags: tuple[str, ...] = ()  # the sweep's recommendation, once the sweep part has run
    started: float = field(default_factory=time.time)  # this run's start (what an earlier run left predates it)

    def module(self, name: str, *args: object) -> list[str]:
        return [self.python, "-m", name, *map(str, args)]


@dataclass
class Part:
    """One measured part: its commands (run in order, one time limit), how to read its output."""

    name: str
    cap: float  # seconds at most
    commands: Callable[[Context], list[list[str]]]
    read: Callable[[Context, str], dict] = lambda ctx, log: {}
    cuda_only: bool = False  # dry mode: the commands only start it; the part reports skipped
    needs: tuple[str, ...] = ()  # parts that must have succeeded first
    # What an earlier run of the part left that a later run not selecting it can use instead
    # (the data part's shards: their manifest is written last); None: nothing lasts.
    made: Callable[[Context], bool] | None = None
    # ``read`` after a failure too: what the part wrote as it went (the sweep's summary) counts.
    salvage: bool = False
    # Files the part's run leaves outside OUT that belong with the results, copied into
    # OUT/<part>/ however the part ended (the service run's log and curve, not its checkpoints).
    keep: Callable[[Context], list[Path]] = lambda ctx: []
    record: dict = field(default_factory=dict)


def keep_files(part: Part, ctx: Context, since: float) -> str | None:
    """Copy ``part.keep``'s files written since the part started into OUT/<part>/, in place of
    what an earlier run left there (an earlier run's files, where this one stopped before writing
    its own, would pass for this run's): OUT is what comes back from a GPU machine, the data
    folder is not.  A copy that fails is said in the returned line, never raised."""
    folder, paths = ctx.out / part.name, part.keep(ctx)
    if not paths:  # OUT/<part> is the part's own then (the sweep writes a file per configuration there)
        return None
    try:
        shutil.rmtree(folder, ignore_errors=True)
        for path in paths:
            if path.is_file() and path.stat().st_mtime >= since - 1:
                folder.mkdir(exist_ok=True)
                shutil.copy2(path, folder / path.name)
    except OSError as exc:
        return f"keeping {part.name}'s files failed: {exc}"
    return None


def result_line(ctx: Context, log: str) -> dict:
    """The ``RESULT {...}`` line a ``bench.gpu_parts`` child prints."""
    lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError("the part printed no RESULT line")
    return json.loads(lines[-1][len("RESULT "):])


# Cores the data part leaves to the gpu-tests part beside it: a test there times ``next(loader)``
# against a busy training stream (tests/test_gpu_speed.py), and the loader's DALI threads need
# cores to do it in.  On the 16-core H200 machine the data part then writes with 12 processes.
CORES_FOR_GPU_TESTS = 4


def data_commands(ctx: Context) -> list[list[str]]:
    per_class, val = (8, 2) if ctx.dry else (900, 50)
    sample, shards = ctx.data / "sample", ctx.data / "shards"
    # dry: one per core (0): a tiny dataset, and the gpu tests only collect
    workers = 0 if ctx.dry else max(1, len(os.sched_getaffinity(0)) - CORES_FOR_GPU_TESTS)
    return [ctx.module("sampledata", "--out", sample, "--train_per_class", per_class, "--val_per_class", val,
                       *(["--classes", 2] if ctx.dry else []), "--workers", workers),
            ctx.module("shards", "--src", sample, "--out", shards, "--shard_samples", 8 if ctx.dry else 1000,
                       "--workers", workers)]


# Seconds per test (the slowest compiles a training step): a hang costs that, not the part's
# limit.  Set as pytest-timeout's ini option: without the plugin it is a warning, not an error.
GPU_TEST_TIMEOUT = 180


def gpu_test_commands(ctx: Context) -> list[list[str]]:
    """``pytest -m gpu`` over every test module, each test's result in the log as it ends (-v:
    the junit report is written only at the exit), a module that cannot be imported costing only
    its own tests; an earlier run's report removed first."""
    base = ctx.module("pytest", "-m", "gpu", "-p", "no:cacheprovider", "-rA", "--continue-on-collection-errors",
                      str(ROOT / "tests"))
    return [base + ["--collect-only", "-q"]] if ctx.dry else [
        ["rm", "-f", str(ctx.out / "gpu_tests.xml")],
        base + ["-v", "-o", f"timeout={GPU_TEST_TIMEOUT}", "--junitxml", ctx.out / "gpu_tests.xml"]]


def gpu_test_read(ctx: Context, log: str) -> dict:
    """The junit report's counts; a run that ended before writing it (the part's limit, a crash
    in CUDA or DALI: salvaged) says what its log said, test by test."""
    if ctx.dry:
        return {"collected": log.strip().splitlines()[-1]}
    if not (ctx.out / "gpu_tests.xml").is_file():
        return {**gpu_parts.log_summary(log),
                "incomplete": "pytest ended before its report: each test's result as its log said it"}
    summary = gpu_parts.junit_summary(ctx.out / "gpu_tests.xml")
    if summary["failed"]:
        raise RuntimeError(f"{len(summary['failed'])} gpu test(s) failed: {json.dumps(summary['failed'])[:1500]}")
    return summary


def model_commands(ctx: Context) -> list[list[str]]:
    extra = ["--batch", 2, "--warmup", 0, "--iters", 1, "--layouts", "grouped"] if ctx.dry else []
    return [ctx.module("bench.bench_model", "--grid", "short", "--report", ctx.out / "model.json", *extra)]


def pipeline_commands(ctx: Context) -> list[list[str]]:
    size = ["--images", 32, "--repeat", 1, "--warmup", 1, "--batch", 8] if ctx.dry else ["--images", 6144, "--repeat", 3]
    return [ctx.module("bench.bench_pipeline", "--shards", ctx.data / "shards", "--report", ctx.out / "pipeline.json",
                       "--configs", "gpu-check", *size)]


# The service part's settings without a sweep recommendation: the fast path measured in run 2.
SERVICE_DEFAULT = ("--loader.batch_size", "128", "--model.autocast", "bfloat16", "--model.channels_last", "true",
                   "--model.compile", "model")
SERVICE_DRY = ("--loader.batch_size", "8", "--model.autocast", "none")


def service_flags(ctx: Context) -> tuple[str, ...]:
    """The sweep's recommended configuration when the sweep part ran, else the default fast path."""
    return ctx.service_flags or (SERVICE_DRY if ctx.dry else SERVICE_DEFAULT)


SERVICE_KEEPS = ("history.json", "log.jsonl", "curve.png", "config.json", "shard-checks.json")


def service_commands(ctx: Context) -> list[list[str]]:
    run = ctx.data / "service-run"
    return [ctx.module("service", "--shards", ctx.data / "shards", "--out", run, "--eval_views", 10, "--fresh", "true",
                       "--log_every", 20, "--model.bias_init", 0.1, "--http.port", 0, "--http.host", "127.0.0.1",
                       "--checkpoint.every_seconds", 0, "--epochs", 1 if ctx.dry else 3, *service_flags(ctx))]


def service_read(ctx: Context, log: str) -> dict:
    """images/s and data-wait share per epoch, and the last epoch against the model alone of the
    same configuration (issue 13's criterion 2): the sweep's measurement of exactly these flags,
    or bench-model's compiled bf16 channels_last configuration for the default flags."""
    alone, source = None, None
    if ctx.service_flags:
        alone, source = gpu_parts.sweep_summary(ctx.out / "sweep.json")["recommended"].get(
            "model_alone_images_per_s"), "sweep: the recommended configuration's step on one of its batches"
    elif (ctx.out / "model.json").is_file():
        configs = gpu_parts.model_summary(ctx.out / "model.json")["configs"]
        alone = (configs.get("grouped bf16 channels_last compiled") or {}).get("images_per_s")
        source = "bench-model: grouped bf16 channels_last compiled"
    history = ctx.data / "service-run" / "history.json"
    if history.is_file() and history.stat().st_mtime < ctx.started - 1:  # the run died before --fresh cleared it
        raise RuntimeError(f"{history} is an earlier run's: this run's service wrote no epoch")
    return {"flags": list(service_flags(ctx)), **gpu_parts.service_summary(ctx.data / "service-run", alone, source)}


def sweep_commands(ctx: Context) -> list[list[str]]:
    # What is left of the budget, less what the service part needs after it (when it runs) and the
    # sweep's own report after its last configuration: killed in its report, the sweep would lose
    # its table, chart and recommended.toml (its summary, sweep.json, is written as it goes).
    reserve = SERVICE_RESERVE if not ctx.only or "service" in ctx.only else 0
    budget = max(30.0, min(SWEEP_CAP, ctx.deadline - time.time() - reserve - SWEEP_TEARDOWN))
    return [ctx.module("bench.sweep", "--shards", ctx.data / "shards", "--out", ctx.out, "--seconds", round(budget),
                       *(["--dry"] if ctx.dry else []))]


def sweep_read(ctx: Context, log: str) -> dict:
    """The sweep's summary (also after a failure: it is rewritten after every configuration),
    unless it is an earlier run's: then this run's sweep wrote none."""
    summary = gpu_parts.sweep_summary(ctx.out / "sweep.json")
    started = datetime.strptime(summary["started"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    if started < ctx.started - 1:
        raise RuntimeError(f"{ctx.out / 'sweep.json'} is an earlier sweep's (started {summary['started']}): "
                           "this run's sweep wrote no summary")
    if summary.get("recommended"):
        ctx.service_flags = tuple(summary["recommended"]["flags"])
    if not summary["ok"]:  # a sweep that measured nothing did not succeed, whatever its exit code
        raise RuntimeError(f"no configuration was measured ({summary['failed']} failed, {summary['skipped']} "
                           f"skipped): see {ctx.out / 'sweep.json'} and {ctx.out / 'logs' / 'sweep'}")
    return summary


def earlier_sweep(ctx: Context) -> dict | None:
    """A sweep this run does not repeat (``--parts`` without it) whose summary is in OUT already,
    in the same mode, with a recommendation: the service part runs that.  A GPU lent for ten
    minutes a call gets the sweep in one call and the service part in the next (docs/benchmarks.md)."""
    path = ctx.out / "sweep.json"
    if not ctx.only or "sweep" in ctx.only or not path.is_file():
        return None
    summary = gpu_parts.sweep_summary(path)
    return summary if summary["recommended"] and summary["mode"] == ("dry" if ctx.dry else "gpu") else None


SWEEP_CAP = 420  # issue 13: the grid in under 7 minutes
SWEEP_TEARDOWN = 40  # after its budget: the table, the chart (matplotlib's import) and recommended.toml
SERVICE_RESERVE = 150  # seconds kept for the service part (3 short epochs, compiled from the shared cache)


PARTS = [
    Part("versions", 60, lambda c: [c.module("bench.gpu_parts", "versions")], result_line),
    Part("nvidia-smi", 30, lambda c: [c.module("bench.gpu_parts", "nvidia-smi")], result_line, cuda_only=True),
    Part("data", 300, data_commands, lambda c, log: gpu_parts.data_summary(c.data / "shards"),
         made=lambda c: (c.data / "shards" / "manifest.json").is_file()),
    Part("gpu-tests", 300, gpu_test_commands, gpu_test_read, cuda_only=True, salvage=True),
    Part("bench-model", 240, model_commands, lambda c, log: gpu_parts.model_summary(c.out / "model.json")),
    Part("bench-pipeline", 200, pipeline_commands,
         lambda c, log: gpu_parts.pipeline_summary(c.out / "pipeline.json"), needs=("data",)),
    Part("sweep", SWEEP_CAP + SWEEP_TEARDOWN, sweep_commands, sweep_read, needs=("data",), salvage=True),
    # salvage: a run cut off in epoch 2 or 3 still has the epochs it finished (``--fresh``: only its own)
    Part("service", 240, service_commands, service_read, needs=("data",), salvage=True,
         keep=lambda c: [c.data / "service-run" / name for name in SERVICE_KEEPS]),
    Part("roi-probe", 60, lambda c: [c.module("bench.gpu_parts", "roi-probe", c.data / "shards")], result_line,
         cuda_only=True, needs=("data",)),
]
SIDE_BY_SIDE = {"data": "gpu-tests"}  # CPU-bound data generation next to the tests (own small data)
