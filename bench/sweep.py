"""``make gpu-check``'s sweep: issue 13's A/B grid, one configuration per child process.

    python -m bench.sweep --shards DIR --out DIR [--seconds 420] [--dry]

Each configuration (``bench.sweep_configs``) is a set of the service's own flags measured by
``bench.sweep_child`` in its own process with its own time limit (a crash or hang loses that
configuration only); every result is written as it arrives (``OUT/sweep/<name>.json``, and the
summary ``OUT/sweep.json`` after each), so a sweep cut short still returns what it measured.

What there is to measure takes longer than the budget: each model configuration compiles a graph
of its own (about a minute each on a GPU machine), while a configuration whose graph is compiled
loads it from the shared inductor cache in seconds.  So one round of graphs is compiled ahead, side
by side (``bench.sweep_compile``), and the order is the order a decision needs (``plan`` says what
and why): the model the service would run and its 10-view evaluation rate; end to end on it, each
lever alone and the levers that helped together, which gives the recommendation and the projected
wall time of 90 epochs; the model levers compiled ahead; the pipeline alone (the hardware
decoder's share: CPU time per image tells how many images took the hybrid path); the service as
configured today; the rest.  A configuration that would compile a new graph in less time than is
left (one compile's measured wall time) is skipped, saying so, and cheaper ones after it still run.

The dry mode (no GPU; ``tests/test_gpu_check.py``) runs the same stages on the CPU at a tiny size
with fewer pipeline configurations and levers; configurations that compile are skipped there
(compiling AlexNet on a CPU takes minutes; ``tests/test_model_step.py`` covers the compiled step).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from bench.child import child_env, failure, reap, slug, write_json
from bench.sweep_report import headline, report
from bench.gpu_parts import projection
from bench.sweep_compile import PARALLEL, compile_many, start_child
from bench.sweep_configs import (AHEAD, BASE_MODELS, DRY, LEVERS, MODEL, MODEL_LEVERS, PIPELINE, SIZES, TODAY, Config,
                                 model_lever, values)
from bench.sweep_toml import write_recommendation

AHEAD_SHARE = 0.45  # of the budget, at most, for compiling ahead (bench.sweep_compile)
FRESH_COMPILE_GUESS = 90.0  # seconds a configuration with a graph not compiled yet needs, until one is measured
MIN_SECONDS = 20.0  # what any configuration needs: a process with torch and DALI, a loader, a few batches
# What stage 1's model needs from the cache after its compile ahead (a guess until measured): the
# process, Dynamo's trace again, the CUDA graphs recorded, 3 + 12 evaluation calls of 1,280 views.
CACHED_GUESS = 45.0


class Sweep:
    """Runs configurations one at a time within the budget and keeps the summary on disk.

    It remembers which graphs have been compiled (into the shared inductor cache) and how long a
    configuration that compiles a new graph took, so a configuration that cannot finish in what is
    left of the budget is skipped, saying so, and the cheaper ones after it still run."""

    def __init__(self, shards: Path, out: Path, seconds: float, dry: bool,
                 clock: Callable[[], float] = time.time) -> None:
        self.shards, self.out, self.dry, self.clock = shards, out, dry, clock
        self.deadline = clock() + seconds
        self.records: dict[str, dict] = {}
        self.configs: dict[str, Config] = {}  # what ran or was tried, by name
        self.compiled: set[tuple] = set()
        self.fresh_seconds: float | None = None  # wall time of the first configuration that compiled
        self.summary = {"mode": "dry" if dry else "gpu", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "seconds_budget": seconds, "configs": self.records}
        (out / "sweep").mkdir(parents=True, exist_ok=True)
        (out / "logs" / "sweep").mkdir(parents=True, exist_ok=True)
        self.save()  # at once: an earlier sweep's summary in OUT is never taken for this one's

    def run(self, config: Config) -> dict:
        """Measure ``config`` in a child (or record why not); returns its record."""
        if config.name in self.records:
            return self.records[config.name]
        self.configs[config.name] = config
        flags = (*config.flags, *DRY) if self.dry else config.flags
        left, fresh = self.deadline - self.clock(), bool(config.graphs - self.compiled)
        need = (self.fresh_seconds or FRESH_COMPILE_GUESS) if fresh else MIN_SECONDS
        if self.dry and config.compiles:
            record = {"status": "skipped", "reason": "dry mode: compiling AlexNet on a CPU takes minutes"}
        elif left < MIN_SECONDS:
            record = {"status": "skipped", "reason": "the sweep's time budget is spent"}
        elif left < need:
            record = {"status": "skipped", "reason": f"a graph not compiled yet: needs ~{need:.0f} s "
                      f"({'measured' if self.fresh_seconds else 'guessed'}), {left:.0f} s of the budget left"}
        else:
            record = self._child(config, flags, min(config.cap, left))
            if record["status"] == "ok":
                if fresh and self.fresh_seconds is None:
                    self.fresh_seconds = record["wall_seconds"]
                self.compiled |= config.graphs
        record = {"name": config.name, "kind": config.kind, "flags": list(flags), **record}
        self.records[config.name] = record
        self.save()
        print(f"sweep: {config.name}: {record['status']} {headline(record)}", flush=True)
        if config.kind == "train" and rate(record):  # a sweep cut off later still recommends
            self.recommend()
        return record

    def precompile(self, configs: list[Config], seconds: float, most: int = PARALLEL) -> None:
        """Compile the graphs of the first ``most`` of ``configs`` with graphs not compiled yet
        (each graph once) side by side, for at most ``seconds`` (``bench.sweep_compile``): those
        that compiled then cost a cached run.  One round of ``PARALLEL`` takes about as long as one
        compile, which the first model needs anyway; a second round would cost the same again
        before anything is measured.  The first of them (``configs`` lists stage 1's model first)
        may compile on past ``seconds``, up to its own cap and ``CACHED_GUESS`` before the
        deadline: cut off, its compile would only start again at once in stage 1.  None when
        ``seconds`` is less than one compile (``FRESH_COMPILE_GUESS``): all but the first would be
        cut off, the first slowed by them, and stage 1 crowded out (a 104 s budget measured
        nothing compiled); stage 1 then compiles its model alone.  Not in the dry mode (nothing
        compiles there)."""
        todo, seen = [], set(self.compiled)
        for config in configs:
            if config.graphs - seen and len(todo) < most:
                todo.append(config)
                seen |= config.graphs
        limit = min(seconds, self.deadline - self.clock() - MIN_SECONDS)
        if self.dry or not todo or limit < FRESH_COMPILE_GUESS:
            return
        first_limit = max(limit, min(todo[0].cap, self.deadline - self.clock() - CACHED_GUESS))
        print(f"sweep: compiling {len(todo)} configurations' graphs ahead, side by side (at most {limit:.0f} s, "
              f"the first at most {first_limit:.0f} s)", flush=True)
        results = self._compile_many(todo, limit, first_limit)
        for config in todo:
            if results[config.name]["status"] == "ok":
                self.compiled |= config.graphs
        walls = [r["wall_seconds"] for r in results.values() if r["status"] == "ok"]
        if walls and self.fresh_seconds is None:  # side by side: an upper bound of one compile alone
            self.fresh_seconds = min(walls)
        self.summary["compiled_ahead"] = results
        self.save()
        print("sweep: compiled ahead: " + ", ".join(f"{n}: {r['status']}" for n, r in results.items()), flush=True)

    def _compile_many(self, configs: list[Config], limit: float, first_limit: float) -> dict[str, dict]:
        return compile_many(configs, self.shards, self.out, limit, first_limit)

    def _child(self, config: Config, flags: tuple[str, ...], limit: float) -> dict:
        name = slug(config.name)
        warmup, steps = SIZES[config.kind][self.dry]
        spec = {"name": config.name, "kind": config.kind, "flags": list(flags), "shards": str(self.shards),
                "warmup": warmup, "steps": steps, "eval_batches": (1 if self.dry else 12) if config.eval else 0,
                # with CUDA graphs a function's first call runs eagerly, its second records the graph
                "eval_warmup": 1 if self.dry else 3,
                "profile_steps": (2 if self.dry else 20) if config.profile else 0,
                "trace": str(self.out / "sweep" / f"{name}-trace.json.gz")}
        start = time.time()
        # perf_hints: inductor says in the log why it skipped CUDA graphs for a graph, if it did
        proc, result, log = start_child(name, spec, self.out, child_env({"TORCH_LOGS": "perf_hints"}))
        code = reap(proc, limit)
        return child_record(result, code, limit, log.read_text(errors="replace"), round(time.time() - start, 1),
                            config.profile)

    def save(self) -> Path:
        return write_json(self.out / "sweep.json", {**self.summary, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def recommend(self) -> None:
        """The fastest end-to-end configuration so far, with its projection, into the summary."""
        ran = [r for r in self.records.values() if r["kind"] == "train" and rate(r)]
        if not ran:
            return
        best = max(ran, key=rate)
        self.summary["recommended"] = {key: best.get(key) for key in (
            "name", "flags", "images_per_s", "data_wait_share", "model_alone_images_per_s", "ratio_to_model_alone")}
        self.summary["projection"] = projection(best["images_per_s"], eval_for(self, tuple(best["flags"])))
        self.save()


def child_record(result: Path, code: int | None, limit: float, log: str, wall: float, profiled: bool) -> dict:
    """What a child's run gave: its result file, written before the exit (and before a profile),
    whatever came after it.  A child that then failed lost its profile (ended in it) or hung or
    crashed in its teardown; the wall time until the measurement was written is the
    configuration's, not the hang's (it may stand for a compile's time: ``fresh_seconds``)."""
    if not result.is_file():
        return {"status": "failed", "seconds": wall, "error": failure(code, limit, log)}
    record = json.loads(result.read_text())
    if code == 0:
        return {**record, "wall_seconds": wall}
    lost = "profile_error" if profiled and not {"profile", "profile_error"} & set(record) else "teardown"
    return {**record, "wall_seconds": record.get("seconds", wall), lost: failure(code, limit, log, 3)}


def rate(record: dict | None) -> float:
    return record.get("images_per_s", 0.0) if record and record.get("status") == "ok" else 0.0


def batch_128(config: Config) -> bool:
    return values(config.flags).get("--loader.batch_size") == "128"


def best_model(sweep: Sweep) -> Config | None:
    """The fastest batch-128 model configuration that ran (the recipe's batch)."""
    done = [c for c in sweep.configs.values() if c.kind == "model" and batch_128(c) and rate(sweep.records[c.name])]
    return max(done, key=lambda c: rate(sweep.records[c.name]), default=None)


def combined_model(sweep: Sweep) -> None:
    """The model levers that each gained over 2% on the compiled step with CUDA graphs, together."""
    base = rate(sweep.records.get(BASE_MODELS[0].name))
    helped = [lever for lever in MODEL_LEVERS if base and rate(sweep.records.get(model_lever(lever).name)) > 1.02 * base]
    if len(helped) > 1:
        sweep.run(model_lever(*helped))


def pairs(flags: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(flags[::2], flags[1::2]))


def end_to_end(sweep: Sweep, model: Config, levers: list) -> list[tuple[str, tuple[str, ...]]]:
    """The loader feeding ``model``'s step with the loader's defaults, then with each lever on its
    own, then the levers that helped (over 2%) combined; returns the levers that helped."""
    base = Config(f"e2e: {model.name.removeprefix('model: ')}", "train", model.flags, 150, profile=True)
    base_rate = rate(sweep.run(base))
    helped = []
    for label, flags in levers:
        if pairs(flags) <= pairs(base.flags):
            continue  # already part of the base configuration
        lever = Config(f"{base.name} + {label}", "train", (*base.flags, *flags), 120)
        if base_rate and rate(sweep.run(lever)) > 1.02 * base_rate:
            helped.append((label, flags))
    if len(helped) > 1:
        sweep.run(Config(f"{base.name} + " + " + ".join(label for label, _ in helped), "train",
                         (*base.flags, *(x for _, flags in helped for x in flags)), 150, profile=True))
    return helped


def plan(sweep: Sweep) -> None:
    """Everything, in the order a decision needs it, so a budget cut short loses the least useful:

    0. one round of graphs compiled ahead, side by side (the first ``PARALLEL`` of ``AHEAD``, in
       at most ``AHEAD_SHARE`` of the budget, stage 1's model up to its own cap): each
       configuration whose graphs compiled then costs a cached run, not a compile;
    1. the model the end-to-end stage stands on: the compiled step with CUDA graphs (else without,
       else eager), with the 10-view evaluation rate;
    2. end to end on it: the loader's defaults, each lever, the levers that helped combined: the
       recommendation (graphs from the cache: seconds each, not a compile);
    3. the model configurations compiled ahead (criterion 1's levers, seconds each);
    4. the pipeline alone (no compile: the decoder's share, threads, the hand-over);
    5. the service as configured today;
    6. the other model configurations (a compile each where not compiled ahead), the model levers
       that gained combined, and if one of them beats stage 1's model, end to end on it with the
       levers that helped.
    """
    dry = sweep.dry
    sweep.precompile(AHEAD, AHEAD_SHARE * (sweep.deadline - sweep.clock()))
    model = next((c for c in BASE_MODELS if rate(sweep.run(c))), None)
    levers = LEVERS[:1] if dry else LEVERS
    helped = end_to_end(sweep, model, levers) if model else []
    sweep.recommend()
    for config in MODEL:
        if config.graphs and config.graphs <= sweep.compiled:
            sweep.run(config)
    for config in PIPELINE[:1] + PIPELINE[-1:] if dry else PIPELINE:
        sweep.run(config)
    sweep.run(TODAY)
    for config in MODEL:
        sweep.run(config)
    combined_model(sweep)
    better = best_model(sweep)
    if model and better and rate(sweep.records[better.name]) > 1.02 * rate(sweep.records[model.name]):
        end_to_end(sweep, better, helped)
    sweep.recommend()


def eval_for(sweep: Sweep, flags: tuple[str, ...]) -> float | None:
    """The 10-view evaluation rate (views/s) measured for the same compile setting as ``flags``."""
    def mode(f: tuple[str, ...]) -> dict:
        return {k: v for k, v in values(f).items() if k.startswith("--model.compile")}

    rates = [r.get("eval_views_per_s") for c in MODEL if (r := sweep.records.get(c.name)) and r.get("eval_views_per_s")
             and mode(c.flags) == mode(flags)]
    return max(rates, default=None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=420)
    p.add_argument("--dry", action="store_true", help="the CPU dry mode (tiny sizes, no compiled configurations)")
    args = p.parse_args(argv)
    sweep = Sweep(args.shards.resolve(), args.out.resolve(), args.seconds, args.dry)
    plan(sweep)
    toml = write_recommendation(sweep.out, sweep.summary, sweep.shards)  # before the chart: it may fail
    report(sweep)
    if toml:
        print(f"\nthe recommendation as config lines ({toml}):\n{toml.read_text()}")
    print(f"wrote {sweep.out / 'sweep.json'} (each configuration: {sweep.out / 'sweep'}, logs: "
          f"{sweep.out / 'logs' / 'sweep'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
