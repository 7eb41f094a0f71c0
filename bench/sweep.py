"""``make gpu-check``'s sweep: issue 13's A/B grid, one configuration per child process.

    python -m bench.sweep --shards DIR --out DIR [--seconds 420] [--dry]

Three stages, in this order, each configuration a set of the service's own flags measured by
``bench.sweep_child`` in its own process with its own time limit (a crash or hang loses that
configuration only); every result is written as it arrives (``OUT/sweep/<name>.json``, and the
summary ``OUT/sweep.json`` after each), so a sweep cut short still returns what it measured:

1. model alone (synthetic batches on the GPU, batch 128, bf16): the compiled whole step, with
   CUDA graphs, with the bf16 channels_last input the normaliser can emit, LRN as window sums,
   NCHW, cuDNN trying every algorithm, eager, and batches 256/512 with the linear lr rule (options
   only: the recipe is batch 128).  The 10-view evaluation forward is timed for the projection.
2. pipeline alone (the GPU training loader, normalised batches): the hardware decoder's share
   (``hw_decoder_load`` 0.65, 1.0 and 0, with and without fancy upsampling: CPU time per image
   tells how many images took the hybrid path, whose Huffman decode runs on DALI's threads),
   threads and prefetch, the stream hand-over.
3. end to end (the loader feeding the step, data wait measured as the service does): the service
   as configured today, then the fastest batch-128 model configuration of stage 1 with the
   loader's defaults (both with a ``torch.profiler`` window) and with each lever on its own (threads
   and prefetch, hardware decoder, stream hand-over, DALI off the training core, blocking CUDA
   syncs, bf16 channels_last batches), then the levers that helped, combined: the recommendation,
   with the projected wall time of 90 epochs.

The dry mode (no GPU; ``tests/test_gpu_check.py``) runs the same stages on the CPU at a tiny size
with fewer pipeline configurations and levers; configurations that compile are skipped there
(compiling AlexNet on a CPU takes minutes; ``tests/test_model_step.py`` covers the compiled step).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.child import child_env, failure, reap, spawn
from bench.gpu_parts import projection

BASE = ("--model.autocast", "bfloat16", "--model.channels_last", "true", "--loader.batch_size", "128")
STEP = ("--model.compile", "step")
GRAPHS = (*STEP, "--model.compile_mode", "reduce-overhead")
BF16_BATCHES = ("--loader.dtype", "bfloat16", "--loader.memory_format", "channels_last")
DRY = ("--loader.batch_size", "8", "--loader.threads", "2", "--model.autocast", "none", "--model.channels_last", "false")
# kind: (warmup batches, timed batches) on a GPU and in the dry mode
SIZES = {"model": ((15, 60), (1, 2)), "pipeline": ((10, 60), (1, 3)), "train": ((25, 150), (1, 3))}


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # "model" | "pipeline" | "train"
    flags: tuple[str, ...]
    cap: float  # seconds
    eval: bool = False  # model: also time the 10-view evaluation forward
    profile: bool = False  # train: a torch.profiler window after the timed one

    @property
    def compiles(self) -> bool:
        values = dict(zip(self.flags[::2], self.flags[1::2]))
        return values.get("--model.compile", "off") != "off"


MODEL = [
    Config("model: compiled step", "model", (*BASE, *STEP), 240, eval=True),
    Config("model: compiled step + CUDA graphs", "model", (*BASE, *GRAPHS), 150, eval=True),
    Config("model: step + graphs, bf16 channels_last batches", "model", (*BASE, *GRAPHS, *BF16_BATCHES), 120),
    Config("model: step + graphs, LRN window_sum", "model", (*BASE, *GRAPHS, "--model.lrn", "window_sum"), 150),
    Config("model: step + graphs, NCHW", "model", (*BASE, *GRAPHS, "--model.channels_last", "false"), 150),
    Config("model: step + graphs, cuDNN tries every algorithm", "model",
           (*BASE, *GRAPHS, "--model.cudnn_benchmark_limit", "0"), 120),
    Config("model: eager", "model", (*BASE, "--model.compile", "off"), 60, eval=True),
    Config("model: step + graphs, batch 256 (lr 0.02, linear rule)", "model",
           (*BASE, *GRAPHS, "--loader.batch_size", "256", "--optim.lr", "0.02"), 150),
    Config("model: step + graphs, batch 512 (lr 0.04, linear rule)", "model",
           (*BASE, *GRAPHS, "--loader.batch_size", "512", "--optim.lr", "0.04"), 150),
]
PIPELINE = [Config(f"pipeline: {label}", "pipeline", (*BASE, "--model.compile", "off", *flags), 60) for label, flags in (
    ("defaults (hw decoder 0.65, fancy upsampling, all cores, prefetch 2)", ()),
    ("hw_decoder_load 1.0", ("--loader.hw_decoder_load", "1.0")),
    ("hw_decoder_load 1.0, no fancy upsampling",
     ("--loader.hw_decoder_load", "1.0", "--loader.jpeg_fancy_upsampling", "false")),
    ("no fancy upsampling", ("--loader.jpeg_fancy_upsampling", "false")),
    ("hw_decoder_load 0 (all hybrid: the CPU-time reference)", ("--loader.hw_decoder_load", "0")),
    ("8 threads, prefetch 4", ("--loader.threads", "8", "--loader.prefetch", "4")),
    ("stream hand-over", ("--loader.handover", "stream")),
)]
TODAY = Config("e2e: the service today (compile model, loader defaults)", "train", (*BASE, "--model.compile", "model"),
               200, profile=True)
LEVERS = [
    ("8 threads, prefetch 4", ("--loader.threads", "8", "--loader.prefetch", "4")),
    ("stream hand-over", ("--loader.handover", "stream")),
    ("hw decoder 1.0", ("--loader.hw_decoder_load", "1.0")),
    ("DALI off the training core", ("--loader.affinity", "spare_core")),
    ("blocking CUDA syncs", ("--cuda_sync", "blocking")),
    ("bf16 channels_last batches", BF16_BATCHES),
]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:80]


class Sweep:
    """Runs configurations one at a time within the budget and keeps the summary on disk."""

    def __init__(self, shards: Path, out: Path, seconds: float, dry: bool) -> None:
        self.shards, self.out, self.dry = shards, out, dry
        self.deadline = time.time() + seconds
        self.records: dict[str, dict] = {}
        self.summary = {"mode": "dry" if dry else "gpu", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "seconds_budget": seconds, "configs": self.records}
        (out / "sweep").mkdir(parents=True, exist_ok=True)
        (out / "logs" / "sweep").mkdir(parents=True, exist_ok=True)

    def run(self, config: Config) -> dict:
        """Measure ``config`` in a child (or record why not); returns its record."""
        flags = (*config.flags, *DRY) if self.dry else config.flags
        left = self.deadline - time.time()
        if self.dry and config.compiles:
            record = {"status": "skipped", "reason": "dry mode: compiling AlexNet on a CPU takes minutes"}
        elif left < 20:
            record = {"status": "skipped", "reason": "the sweep's time budget is spent"}
        else:
            record = self._child(config, flags, min(config.cap, left))
        record = {"name": config.name, "kind": config.kind, "flags": list(flags), **record}
        self.records[config.name] = record
        self.save()
        print(f"sweep: {config.name}: {record['status']} {headline(record)}", flush=True)
        return record

    def _child(self, config: Config, flags: tuple[str, ...], limit: float) -> dict:
        name = slug(config.name)
        result = self.out / "sweep" / f"{name}.json"
        warmup, steps = SIZES[config.kind][self.dry]
        spec = {"name": config.name, "kind": config.kind, "flags": list(flags), "shards": str(self.shards),
                "warmup": warmup, "steps": steps, "eval_batches": (1 if self.dry else 4) if config.eval else 0,
                "profile_steps": (2 if self.dry else 20) if config.profile else 0,
                "trace": str(self.out / "sweep" / f"{name}-trace.json.gz")}
        log = self.out / "logs" / "sweep" / f"{name}.log"
        start = time.time()
        # perf_hints: inductor says in the log why it skipped CUDA graphs for a graph, if it did
        code = reap(spawn([sys.executable, "-m", "bench.sweep_child", json.dumps(spec), str(result)], log,
                          child_env({"TORCH_LOGS": "perf_hints"})), limit)
        if code == 0 and result.is_file():
            return json.loads(result.read_text())
        return {"status": "failed", "seconds": round(time.time() - start, 1),
                "error": failure(code, limit, log.read_text(errors="replace"))}

    def save(self) -> Path:
        path = self.out / "sweep.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.summary, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
        tmp.replace(path)
        return path


def rate(record: dict | None) -> float:
    return record.get("images_per_s", 0.0) if record and record.get("status") == "ok" else 0.0


def best_model(sweep: Sweep) -> Config | None:
    """The fastest batch-128 model configuration that ran (the recipe's batch)."""
    done = [c for c in MODEL if "--loader.batch_size" not in c.flags[len(BASE):] and rate(sweep.records.get(c.name))]
    return max(done, key=lambda c: rate(sweep.records[c.name]), default=None)


def pairs(flags: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(flags[::2], flags[1::2]))


def end_to_end(sweep: Sweep) -> Config:
    """Stage 3; returns the fastest configuration end to end (the recommendation)."""
    ran = [TODAY]
    sweep.run(TODAY)
    model = best_model(sweep) or Config("model: eager", "model", (*BASE, "--model.compile", "off"), 60)
    base = Config(f"e2e: {model.name.removeprefix('model: ')}", "train", model.flags, 150, profile=True)
    ran.append(base)
    base_rate = rate(sweep.run(base))
    helped = []
    for label, flags in LEVERS[:1] if sweep.dry else LEVERS:
        if pairs(flags) <= pairs(base.flags):
            continue  # already part of the base configuration
        lever = Config(f"{base.name} + {label}", "train", (*base.flags, *flags), 120)
        ran.append(lever)
        if rate(sweep.run(lever)) > 1.02 * base_rate:
            helped.append((label, flags))
    if len(helped) > 1:
        combined = Config(f"{base.name} + " + " + ".join(label for label, _ in helped), "train",
                          (*base.flags, *(x for _, flags in helped for x in flags)), 150, profile=True)
        ran.append(combined)
        sweep.run(combined)
    return max(ran, key=lambda c: rate(sweep.records.get(c.name)))


def eval_for(sweep: Sweep, config: Config) -> float | None:
    """The 10-view evaluation rate (views/s) measured for the same compile setting as ``config``."""
    mode = {k: v for k, v in zip(config.flags[::2], config.flags[1::2]) if k.startswith("--model.compile")}
    rates = [r.get("eval_views_per_s") for c in MODEL if (r := sweep.records.get(c.name)) and r.get("eval_views_per_s")
             and {k: v for k, v in zip(c.flags[::2], c.flags[1::2]) if k.startswith("--model.compile")} == mode]
    return max(rates, default=None)


def headline(record: dict) -> str:
    if record["status"] != "ok":
        return (record.get("reason") or record.get("error") or "").splitlines()[0][:100]
    parts = [f"{record['images_per_s']:.0f} img/s"]
    for key, fmt in (("data_wait_share", "data wait {:.1%}"), ("ratio_to_model_alone", "{:.2f}x model alone"),
                     ("eval_views_per_s", "eval {:.0f} views/s"), ("cpu_us_per_image", "{:.0f} CPU us/image")):
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    return ", ".join(parts)


def report(sweep: Sweep) -> None:
    """The table on stdout and the chart next to the summary."""
    from bench.charts import bars

    print(f"\n{'configuration':<78} {'status':<8} result")
    for name, record in sweep.records.items():
        print(f"{name:<78} {record['status']:<8} {headline(record)}")
    done = {name: r["images_per_s"] for name, r in sweep.records.items() if r["status"] == "ok"}
    if done:
        bars(sweep.out / "sweep.png", done, "images/s (model and e2e: training; pipeline: normalised batches)",
             f"issue 13 sweep ({sweep.summary['mode']} mode)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=420)
    p.add_argument("--dry", action="store_true", help="the CPU dry mode (tiny sizes, no compiled configurations)")
    args = p.parse_args(argv)
    sweep = Sweep(args.shards.resolve(), args.out.resolve(), args.seconds, args.dry)
    for config in MODEL + (PIPELINE[:1] + PIPELINE[-1:] if args.dry else PIPELINE):
        sweep.run(config)
    chosen = end_to_end(sweep)
    if rate(sweep.records.get(chosen.name)):
        record = sweep.records[chosen.name]
        sweep.summary["recommended"] = {"name": chosen.name, "flags": record["flags"],
                                        "images_per_s": record["images_per_s"],
                                        "data_wait_share": record.get("data_wait_share"),
                                        "model_alone_images_per_s": record.get("model_alone_images_per_s"),
                                        "ratio_to_model_alone": record.get("ratio_to_model_alone")}
        sweep.summary["projection"] = projection(record["images_per_s"], eval_for(sweep, chosen))
    sweep.save()
    report(sweep)
    print(f"wrote {sweep.out / 'sweep.json'} (each configuration: {sweep.out / 'sweep'}, logs: "
          f"{sweep.out / 'logs' / 'sweep'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
