"""What checking the shards against the manifest costs: sha256 throughput per core, the
``data.verify before`` pass on every core, and the training loop next to the ``background`` pass.

Hashing runs ``shards.tarwriter.sha256_file`` (the manifest's checksum) over a temporary file
from the page cache (storage speed is the machine's own limit on top).  Training is the bare
``train_step`` loop on pre-loaded batches; the background hash is a thread at the lowest CPU
priority (``service.shard_check.lowest_priority``), hashing the file over and over.  Rounds
interleave "alone" and "next to the hash" so other load hits both alike.

    .venv/bin/python -m bench.bench_shard_check --report bench/shard_check.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.charts import bars
from bench.inputs import device_arg, report_arg
from bench.record import finish, header, where
from bench.scaled_lr import bench_lr
from common.config_values import at_least_one
from model import AlexNet, PaperSGD, train_step
from model.optim import param_groups
from service.shard_check import lowest_priority
from shards.tarwriter import sha256_file

# The train + val shards of ImageNet at the default size and quality: 1,331,167 images at the sample
# shards' 23.5 KB each (docs/benchmarks.md, Shards), not the ~140 GB of source JPEGs.
IMAGENET_BYTES = 31e9
RUNS = ("training alone", "next to the hash at nice 19 (the service)", "next to the hash at nice 0")


def memory_gbps(seconds: float = 2.0) -> float:
    """sha256 of an in-memory buffer, one thread: the CPU's own rate."""
    buf, done, start = os.urandom(64 << 20), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        hashlib.sha256(buf).digest()
        done += len(buf)
    return done / (time.perf_counter() - start) / 1e9


def file_gbps(path: Path, threads: int) -> float:
    """sha256_file of ``threads`` copies' worth of ``path`` at once (page cache)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(sha256_file, [path] * threads))
    return threads * path.stat().st_size / (time.perf_counter() - start) / 1e9


class BackgroundHash:
    """The background pass's load: ``path`` hashed over and over in a thread, at the lowest CPU
    priority as the service runs it (``nice``) or at the loop's own."""

    def __init__(self, path: Path, nice: bool) -> None:
        self.path, self.nice, self.hashed, self._stop = path, nice, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        """``sha256_file``'s loop (1 MiB blocks), counting every block: a niced thread on a busy
        CPU may not finish one file while it is timed."""
        if self.nice:
            lowest_priority()
        while not self._stop.is_set():
            digest = hashlib.sha256()
            with open(self.path, "rb") as f:
                while (block := f.read(1 << 20)) and not self._stop.is_set():
                    digest.update(block)
                    self.hashed += len(block)

    def __enter__(self) -> BackgroundHash:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def training(args: argparse.Namespace, path: Path) -> dict:
    """Seconds per step alone and next to the background hash, and the hash's rate meanwhile."""
    torch.manual_seed(0)
    model, device = AlexNet().to(args.device), torch.device(args.device)
    optimizer = PaperSGD(param_groups(model, 5e-4), lr=bench_lr(args.batch))
    x = 50 * torch.randn(args.batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    losses: list[float] = []

    def steps() -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = train_step(model, optimizer, x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / args.steps
        losses.append(loss.item())  # after the clock: the item's sync is not timed
        if not math.isfinite(losses[-1]):
            raise SystemExit(f"bench_shard_check: the training loss went {losses[-1]} at batch {args.batch}, lr "
                             f"{bench_lr(args.batch):g}: the steps would be timed on diverged weights, so nothing "
                             f"is reported; try a --batch nearer the paper's 128")
        return seconds

    steps()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in RUNS}
    rates: dict[str, list[float]] = {name: [] for name in RUNS[1:]}
    for r in range(args.rounds):
        times[RUNS[0]].append(steps())
        for name, nice in zip(RUNS[1:], (True, False)):
            with BackgroundHash(path, nice) as bg:
                start = time.perf_counter()
                times[name].append(steps())
                rates[name].append(bg.hashed / (time.perf_counter() - start) / 1e9)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{name} {1e3 * t[-1]:.0f} ms/step" + (f" ({rates[name][-1]:.3f} GB/s hashed)" if name in rates else "")
            for name, t in times.items()), flush=True)
    return {"seconds_per_step": times, "background_gbps_while_training": rates, "last_loss": losses[-1]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    on_gpu = torch.cuda.is_available()
    p.add_argument("--report", type=report_arg, default=Path("bench/shard_check.json"))
    p.add_argument("--megabytes", type=at_least_one(), default=512, help="size of the file hashed")
    p.add_argument("--device", type=device_arg, default="cuda" if on_gpu else "cpu")
    p.add_argument("--batch", type=at_least_one(), default=128 if on_gpu else 32)
    p.add_argument("--steps", type=at_least_one(), default=200 if on_gpu else 4)
    p.add_argument("--rounds", type=at_least_one(), default=3)
    args = p.parse_args(argv)
    report = header("shard check: sha256 and training next to it")
    cores = report["machine"]["cpu_cores"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.bin"
        path.write_bytes(os.urandom(args.megabytes << 20))
        sha256_file(path)  # into the page cache
        rates = {"sha256, memory, 1 thread": memory_gbps(),
                 "sha256_file, 1 thread": statistics.median(file_gbps(path, 1) for _ in range(3)),
                 f"sha256_file, {cores} threads (verify before)": statistics.median(
                     file_gbps(path, cores) for _ in range(3))}
        train = training(args, path)
    med = {k: statistics.median(v) for k, v in train["seconds_per_step"].items()}
    bg = {k: statistics.median(v) for k, v in train["background_gbps_while_training"].items()}
    minutes = {"one core, no training": IMAGENET_BYTES / rates["sha256_file, 1 thread"] / 1e9 / 60,
               "every core (verify before)": IMAGENET_BYTES / rates[list(rates)[2]] / 1e9 / 60,
               **{f"{k}, while training": IMAGENET_BYTES / max(v, 1e-9) / 1e9 / 60 for k, v in bg.items()}}
    summary = {"gbps": rates, "median_seconds_per_step": med, **train, "background_gbps_median": bg,
               "training_slowdown": {k: med[k] / med[RUNS[0]] - 1 for k in RUNS[1:]}, "imagenet_minutes": minutes}
    for name, gbps in rates.items():
        print(f"{name:46} {gbps:6.2f} GB/s")
    print(f"training ({args.device}, batch {args.batch}, lr {bench_lr(args.batch):g}), median ms/step:")
    for name, seconds in med.items():
        extra = (f" ({100 * summary['training_slowdown'][name]:+.1f}%, hashing {bg[name]:.3f} GB/s)"
                 if name in bg else "")
        print(f"  {name:46} {1e3 * seconds:8.0f}{extra}")
    for name, value in minutes.items():
        print(f"ImageNet's ~31 GB of shards, {name}: {value:.1f} min")
    report.update({"file_megabytes": args.megabytes, "device": args.device, "batch": args.batch,
                   "lr": bench_lr(args.batch), "steps_per_run": args.steps, "rounds": args.rounds, **summary})
    finish(report)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    bars(args.report.with_suffix(".png"), rates, "GB/s (page cache)", f"sha256 of shard bytes, {where(report)}",
         unit=" GB/s")
    print(f"wrote {args.report} and {args.report.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
