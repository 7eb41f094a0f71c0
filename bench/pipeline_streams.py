"""What ``make bench-pipeline`` times: every configuration as an endless stream of batch sizes.

Each stream is built (pipeline, thread pool, worker processes) before any timing starts and
yields how many images each batch held; ``bench.bench_pipeline`` times stretches of them.  The
decode floor's work happens in worker processes, so ``cpu_seconds`` adds the CPU time they
report to this process's own: the CPU cost per image is then comparable across streams.
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from pipeline import LoaderConfig, build_train_loader
from shards.manifest import load


def batch_sizes(loader) -> Iterator[int]:
    """Sizes of the (normalised) batches of ``loader``, epoch after epoch, forever."""
    while True:
        for batch in loader:
            yield len(batch[1])


def raw_sizes(loader, device: torch.device | None = None) -> Iterator[int]:
    """Sizes of ``loader``'s uint8 batches (``raw_batches``), forever; with ``device``, the
    crops are moved there (a no-op when DALI already decoded on that GPU)."""
    while True:
        for raw in loader.raw_batches():
            if device is not None:
                raw.images.to(device, non_blocking=True)
            yield len(raw)


def synced(stream: Iterator[int]) -> Iterator[int]:
    """Wait for the GPU after each batch, so asynchronous kernels are inside the timing."""
    for n in stream:
        torch.cuda.synchronize()
        yield n


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus what the decode-floor workers reported."""
    t = os.times()
    return t.user + t.system + _CHILD_CPU[0]


def train_jpegs(shards: Path, limit: int) -> list[bytes]:
    """The first ``limit`` training JPEGs, as bytes."""
    out: list[bytes] = []
    for shard in load(shards, splits=("train",)).splits["train"].shards:
        with tarfile.open(shard.tar) as tar:
            out += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
        if len(out) >= limit:
            break
    return out[:limit]


_JPEGS: list[list[bytes]] = []  # per process; set before the pool forks, so never pickled
_CHILD_CPU = [0.0]  # CPU seconds the decode-floor workers reported


def _pil_decode(worker: int) -> tuple[int, float]:
    """Decode this worker's JPEGs; (images, CPU seconds it took)."""
    start = time.process_time()
    for data in _JPEGS[worker]:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").load()
    return len(_JPEGS[worker]), time.process_time() - start


def pil_floor(jpegs: list[bytes], processes: int, chunk: int = 512) -> Iterator[int]:
    """Pillow decode of the same bytes, one process per core: images decoded per round of
    ``chunk`` images per process, forever.  The bytes reach the workers by fork (sending them
    with each round would bill pickling to the floor); the pool starts before the first round."""
    _JPEGS[:] = [(jpegs[i::processes] * chunk)[:chunk] for i in range(processes)]
    with get_context("fork").Pool(processes) as pool:
        pool.map(_pil_decode, range(processes))  # imports, first allocations
        try:
            while True:
                done = pool.map(_pil_decode, range(processes), chunksize=1)
                _CHILD_CPU[0] += sum(cpu for _, cpu in done)
                yield sum(n for n, _ in done)
        except GeneratorExit:  # closed between rounds: the idle workers end on their own (the
            pool.close()       # with's terminate() relies on SIGTERM reaching them)
            pool.join()
            raise


def dali_decode_only(shards: Path, threads: int, batch: int, device: str) -> Iterator[int]:
    """Batch sizes of a reader + decoder DALI pipeline (no augmentation, nothing copied out)."""
    from nvidia.dali import fn, pipeline_def, types

    split = load(shards, splits=("train",)).splits["train"]

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=0 if device == "mixed" else None,
                  exec_dynamic=True, prefetch_queue_depth=2)
    def graph():
        jpg = fn.readers.webdataset(paths=[str(s.tar) for s in split.shards],
                                    index_paths=[str(s.index) for s in split.shards], ext=["jpg"],
                                    missing_component_behavior="error", random_shuffle=True, name="Reader")
        return fn.decoders.image(jpg, device=device, output_type=types.RGB)

    pipe = graph()
    pipe.build()
    while True:
        yield len(pipe.run()[0])


# ``--configs gpu-check``: the GPU path and the CPU decode it is compared with (no 1-thread,
# fast-IDCT or reference-loader runs, which only matter on CPU-only machines).
GPU_CHECK = ("decode_floor", "pipeline", "dali_decode_only", "pipeline_mixed",
             "pipeline_mixed_with_gpu_normalize", "dali_decode_only_mixed")


def streams(args: argparse.Namespace) -> dict[str, Iterator[int]]:
    """Every selected configuration as an endless stream of batch sizes (built before any timing)."""
    cores = len(os.sched_getaffinity(0))
    cfg = LoaderConfig(batch_size=args.batch, threads=cores, seed=0)
    make = {
        "decode_floor": lambda: pil_floor(train_jpegs(args.shards, 2048), cores),
        "pipeline": lambda: raw_sizes(build_train_loader(args.shards, config=cfg)),
        "pipeline_fast_idct": lambda: raw_sizes(build_train_loader(args.shards, config=cfg.replace(fast_idct=True))),
        "pipeline_with_cpu_normalize": lambda: batch_sizes(build_train_loader(args.shards, config=cfg)),
        "dali_decode_only": lambda: dali_decode_only(args.shards, cores, args.batch, "cpu"),
        "pipeline_1_thread": lambda: raw_sizes(build_train_loader(args.shards, config=cfg.replace(threads=1))),
    }
    if torch.cuda.is_available():
        gpu_cfg, cuda = cfg.replace(threads=min(cores, 8)), torch.device("cuda")
        make["pipeline_mixed"] = lambda: synced(
            raw_sizes(build_train_loader(args.shards, device=cuda, config=gpu_cfg), cuda))
        make["pipeline_mixed_with_gpu_normalize"] = lambda: synced(
            batch_sizes(build_train_loader(args.shards, device=cuda, config=gpu_cfg)))
        make["dali_decode_only_mixed"] = lambda: dali_decode_only(args.shards, gpu_cfg.num_threads, args.batch, "mixed")
    wanted = GPU_CHECK if args.configs == "gpu-check" else tuple(make)
    return {name: make[name]() for name in wanted if name in make}
