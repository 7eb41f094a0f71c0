"""Compiling the sweep's graphs ahead, several side by side (``bench.sweep.plan``'s first stage).

What the sweep's budget goes on is compiling: every model configuration compiles a training step of
its own, about a minute each on a GPU machine (the compiled model's first 20 steps took 50 s on
the H200 in run 2: ``bench/gpu/gpu_check-run2.json``), and one after another the budget holds
only a few.  Most of a compile is single-threaded Python (Dynamo's trace, AOTAutograd, Inductor's
lowering and code generation); only Triton's kernel builds use more cores.  A GPU machine has
many more cores than one compile uses (16 on the H200s lent so far), so several compiles side by
side take about as long as one, and afterwards each configuration loads its graph from the shared
inductor cache in seconds.

Each child here is ``bench.sweep_child`` on the configuration's flags as a "model" run of one
warm-up and one timed step (and one evaluation batch where the configuration times evaluation):
the step is the one the loader-fed run takes, since the synthetic batch has the loader's dtype,
layout and shape.  What it measures is thrown away; what is kept is the cache.  A child that
fails or is still compiling at the time limit leaves its configuration uncompiled: the sweep then
treats it as any other (a fresh compile, run or skipped by the budget) and its log says why.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from bench.child import child_env, failure, kill, slug, spawn
from bench.sweep_configs import Config

PARALLEL = 6  # compiles side by side: a 16-core machine gives each 2 of Triton's compile threads and spare cores
POLL = 0.5  # seconds


def compile_many(configs: list[Config], shards: Path, out: Path, limit: float,
                 first_limit: float | None = None) -> dict[str, dict]:
    """Compile ``configs`` (in order, ``PARALLEL`` at a time) within ``limit`` seconds; per name,
    ``{"status": "ok" | "failed" | "not started", "wall_seconds", "error"?}``.

    ``first_limit`` (at least ``limit``): the first configuration, the one the sweep runs next,
    may go on compiling until then while the others are cut off at ``limit``.  Killing it would
    throw away the part of its compile that is not in the cache yet, only for the sweep to start
    that compile again at once."""
    threads = max(1, len(os.sched_getaffinity(0)) // PARALLEL)
    env = child_env({"TORCHINDUCTOR_COMPILE_THREADS": str(threads), "TORCH_LOGS": "perf_hints"})
    queue, running, results = list(configs), {}, {}
    start = time.time()
    end = start + limit
    ends = {c.name: end for c in configs} | ({configs[0].name: start + max(limit, first_limit)}
                                             if configs and first_limit else {})
    while queue or running:
        while queue and len(running) < PARALLEL and time.time() < end - 1:
            config = queue.pop(0)
            running[config.name] = (*_start(config, shards, out, env), time.time())
        time.sleep(POLL)
        now = time.time()
        cut = {name for name, (proc, *_) in running.items() if proc.poll() is None and now >= ends[name]}
        kill(*(running[name][0] for name in cut))  # all together, not one after another
        for name, (proc, result, log, started) in list(running.items()):
            if proc.poll() is None:
                continue
            code = None if name in cut else proc.wait()
            wall = round(time.time() - started, 1)
            results[name] = {"status": "ok", "wall_seconds": wall} if result.is_file() else {
                "status": "failed", "wall_seconds": wall, "error": failure(code, wall, log.read_text(errors="replace"))}
            del running[name]
        if now >= end:
            queue.clear()
    for config in configs:
        results.setdefault(config.name, {"status": "not started", "wall_seconds": 0.0})
    return results


def _start(config: Config, shards: Path, out: Path, env: dict[str, str]):
    """A child compiling ``config``'s graphs: (process, its result file, its log)."""
    spec = {"name": config.name, "kind": "model", "flags": list(config.flags), "shards": str(shards),
            "warmup": 1, "steps": 1, "eval_batches": 1 if config.eval else 0, "profile_steps": 0}
    return start_child(slug("compile " + config.name), spec, out, env)


def start_child(name: str, spec: dict, out: Path, env: dict[str, str]):
    """``bench.sweep_child`` on ``spec``, its result in ``OUT/sweep/<name>.json`` (an old one
    removed first) and its output in ``OUT/logs/sweep/<name>.log``: (process, result, log)."""
    result, log = out / "sweep" / f"{name}.json", out / "logs" / "sweep" / f"{name}.log"
    result.unlink(missing_ok=True)
    proc = spawn([sys.executable, "-m", "bench.sweep_child", json.dumps(spec), str(result)], log, env)
    return proc, result, log
