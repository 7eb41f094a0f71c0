"""``make bench-pipeline``: images/s of the DALI training pipeline next to the JPEG decode floor.

Measured, each as the median of ``--repeat`` timed runs of ``--images`` images.  The
configurations are INTERLEAVED (run 1 of every configuration, then run 2, ...) so that load
from other jobs on a shared machine hits them alike (the reference loader runs last, see
``measure_all``); warm-up (pipeline build, thread start, shuffle-buffer fill, the first
``--warmup`` batches, and before each later run the batches a paused pipeline had prefetched)
is never timed.

1. ``pipeline``: the DALI training loader as the service builds it (``build_train_loader``),
   up to the uint8 batch handed to the device normaliser (``DaliLoader.raw_batches``: read,
   crop-window decode, draws, labels, uint8 torch tensors).  On a GPU machine the normaliser then
   costs microseconds on the GPU, so this is the service's input pipeline.
   ``pipeline_fast_idct``: the same with ``fast_idct=True``.
   ``pipeline_with_cpu_normalize``: the same loader iterated as on a CPU-only machine, i.e.
   including the float normalisation (mean image, lighting, CHW float32) on this CPU.
2. ``reference``: the plain-PyTorch loader (webdataset + Pillow(-SIMD) + DataLoader workers).
3. ``decode_floor``: decoding the same JPEG bytes (held in memory) to RGB with Pillow-SIMD (or
   the plain Pillow that is installed: the record and table say which), no augmentation, one
   process per core.  Also reported: DALI's own decode-only pipeline (reader +
   CPU decoder, all cores).
4. ``scaling``: the pipeline with 1 thread and with all cores.
5. ``mixed``: the GPU decode path (``device="mixed"``), only when a GPU is present.

Also: the normaliser alone on the CPU, ms per batch (random uint8 crops, same batch size).
``ratio`` = pipeline / decode_floor (the issue's target: >= 0.9); ``ratio_fast_idct`` and
``ratio_with_cpu_normalize`` likewise for those two.

This file times; what is timed is built in ``bench.pipeline_streams``, and the JSON record,
table and chart are made in ``bench.pipeline_report``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import torch

from bench.inputs import report_arg, shards_or_exit
from bench.pipeline_report import chart, print_table, report
from bench.pipeline_streams import batch_sizes, cpu_seconds, streams
from bench.record import finish, header
from common.config_values import at_least_one
from pipeline import LoaderConfig
from pipeline.reference import build_reference_loader
from shards.manifest import load
from shards.config import ShardConfig


def rate(stream: Iterator[int], images: int, warmup: int) -> tuple[float, float]:
    """(images/s, CPU microseconds per image) of one stretch of ``images`` images, after
    ``warmup`` untimed batches.  CPU time per image barely depends on what else runs on the
    machine, so it is the steadier comparison on a shared one."""
    for _ in islice(stream, warmup):
        pass
    start, cpu, done = time.perf_counter(), cpu_seconds(), 0
    while done < images:
        done += next(stream)
    return done / (time.perf_counter() - start), 1e6 * (cpu_seconds() - cpu) / done


def normalizer_ms(shards: Path, batch: int, reuse: bool = True, repeat: int = 7) -> float:
    """Median ms of the CPU normaliser on one batch of random uint8 crops (mean-image mode);
    ``reuse=False``: a fresh output batch every time (``pipeline.buffers`` explains the cost)."""
    from pipeline.buffers import OutputPool
    from pipeline.normalize import DeviceNormalizer
    from pipeline.stats import load_stats

    norm = DeviceNormalizer(load_stats(load(shards, splits=("train",)).stats_path), LoaderConfig())
    if not reuse:
        norm._pool = OutputPool(keep=0)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, generator=gen)
    anchors, mirror = torch.randint(0, 33, (batch, 2), generator=gen), torch.randint(0, 2, (batch,), generator=gen)
    alpha = torch.randn(batch, 3, generator=gen) * 0.1
    norm(images, anchors, mirror, alpha)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        norm(images, anchors, mirror, alpha)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure_all(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Every configuration's images/s: ``repeat`` runs each, interleaved across configurations;
    the reference loader last and on its own, because its DataLoader workers keep decoding
    ahead in the background after a run stops and would slow whichever configuration came next."""
    live = streams(args)
    runs: dict[str, list[float]] = {name: [] for name in live}
    cpu: dict[str, list[float]] = {name: [] for name in live}
    for r in range(args.repeat):
        for name, stream in live.items():
            # A paused pipeline has ``prefetch`` batches ready: drain them (and one more) untimed.
            images_per_s, us = rate(stream, args.images, args.warmup if r == 0 else 3)
            runs[name].append(images_per_s)
            cpu[name].append(us)
            print(f"round {r + 1}/{args.repeat} {name}: {images_per_s:.0f} images/s", flush=True)
    if args.configs == "gpu-check":
        return runs, cpu
    cfg = LoaderConfig(batch_size=args.batch, threads=len(os.sched_getaffinity(0)), seed=0)
    reference = batch_sizes(build_reference_loader(args.shards, config=cfg))
    # (its CPU time is in its DataLoader workers, not measured)
    runs["reference"] = []
    for r in range(args.repeat):
        runs["reference"].append(rate(reference, args.images, args.warmup if r == 0 else 0)[0])
        print(f"round {r + 1}/{args.repeat} reference: {runs['reference'][-1]:.0f} images/s", flush=True)
    return runs, cpu


def main(argv: Iterable[str] | None = None) -> dict:
    """Run the benchmark; print the table; write REPORT (.json) and a PNG chart next to it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=Path, default=ShardConfig.out)
    parser.add_argument("--report", type=report_arg, default=Path("bench/pipeline.json"))
    parser.add_argument("--batch", type=at_least_one(), default=128)
    parser.add_argument("--images", type=at_least_one(), default=3072, help="images per timed run")
    parser.add_argument("--repeat", type=at_least_one(), default=5)
    parser.add_argument("--warmup", type=int, default=8, help="untimed batches before the first run")
    parser.add_argument("--configs", choices=["all", "gpu-check"], default="all",
                        help="gpu-check: the GPU path and the CPU decode it is compared with")
    args = parser.parse_args(list(argv) if argv is not None else None)
    shards_or_exit("bench_pipeline", args.shards)  # one line with the fix, before anything is timed
    head = header("input pipeline throughput", "dali", "pillow", "webdataset")
    runs, cpu = measure_all(args)
    normalize_ms = {"reused_output": normalizer_ms(args.shards, args.batch),
                    "fresh_output": normalizer_ms(args.shards, args.batch, reuse=False)}
    record = report(head, runs, normalize_ms, args)
    record["cpu_us_per_image"] = {k: statistics.median(v) for k, v in cpu.items()}
    record["cpu_runs"] = cpu
    finish(record)
    print_table(record, runs)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(record, indent=2) + "\n")
    chart(record, runs, args.report.with_suffix(".png"))
    print(f"wrote {args.report} and {args.report.with_suffix('.png')}")
    return record


if __name__ == "__main__":
    main()
