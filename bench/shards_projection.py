"""The ImageNet projection of ``make bench-shards``: a fresh run's seconds at 8, 32 and 64 cores
from costs measured on this machine.

The model (each term measured, see ``bench_shards``):

- scan + global shuffle: the parent alone, seconds per image, measured on a tree of hard
  links in ImageNet's shape (1,000 class directories, 1 in 27 images under ``val/``);
- writing: the 267 whole-shard tasks of ImageNet's plan (256 x 5,000 + 1,167 train, 10 x 5,000
  val) handed out in order to the first free worker, each costing its images times the
  measured worker CPU per image.  Idle workers at the end are the price of whole-shard tasks
  (``whole_shard_efficiency``);
- the parent while writing: its per-image task cost (building and pickling each run's task)
  plus its per-second cost (progress reports, the bar, waiting), the latter scaled by the worker
  count; writing takes the longer of the workers and the parent;
- statistics: 20,000 images in 128-image tasks at the measured CPU per image.

Assumed: every core as fast as one here, the storage keeps up (reads ~140 GB of JPEGs and
writes ~31 GB of shards), ImageNet's images cost what the sample's do (about 500x375, 10% over
1000 px: ImageNet's average is about 400x350).
"""
from __future__ import annotations

import heapq
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

from shards.build import ordered
from shards.config import ShardConfig
from shards.journal import Journal
from shards.layouts import scan
from shards.sources import Source
from shards.write_split import SplitWriter, write_run

IMAGENET = {"train": 1_281_167, "val": 50_000}
PROJECTED_CORES = (8, 32, 64)


@contextmanager
def imagenet_like_tree(files: list[str], count: int, near: Path) -> Iterator[Path]:
    """``count`` hard links to ``files`` in ImageNet's shape: 1,000 class directories, 1 in 27 under val/.

    Made in a temporary directory next to ``near`` (the sample data): a hard link cannot cross
    file systems, and ``/tmp`` is often another one.
    """
    root = Path(tempfile.mkdtemp(prefix=".bench-links-", dir=near.parent))
    try:
        for i in range(count):
            link = root / ("val" if i % 27 == 0 else "train") / f"n{i % 1000:08d}" / f"{i:07d}.JPEG"
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(files[i % len(files)], link)
        yield root
    finally:
        shutil.rmtree(root)


def scan_seconds_per_image(tree: Path, count: int) -> float:
    """Scan + global shuffle of ``tree`` (the parent's work before any worker starts), per image."""
    start = time.perf_counter()
    inventory = scan(tree)
    for split in ("train", "val"):
        ordered(inventory, split, 0)
    return (time.perf_counter() - start) / count


def task_cpu_per_image(count: int = 100_000, shard_samples: int = 5000) -> float:
    """The parent's per-image work while writing: building each run's task and pickling it for its worker.

    The real ``SplitWriter.runs`` over ``count`` sources with ImageNet-length paths, each task
    pickled as ``Connection.send`` does.  (Per shard the parent also renames two files and
    appends a journal line: well under a millisecond per 5,000 images, left out.)
    """
    classes = [f"n{c:08d}" for c in range(1000)]
    wnids = [classes[i % 1000] for i in range(count)]
    sources = [Source("train", w, f"/data/imagenet/train/{w}/{w}_{i}.JPEG") for i, w in enumerate(wnids)]
    with tempfile.TemporaryDirectory() as out:
        cfg = ShardConfig(out=Path(out), shard_samples=shard_samples)
        journal = Journal(Path(out) / "train", "bench")
        writer = SplitWriter(cfg, "train", sources, classes, journal, lambda tars: [], "/data/imagenet")
        start = time.process_time()
        for run in writer.runs():
            ForkingPickler.dumps((write_run, run))
        return (time.process_time() - start) / count


def makespan(task_seconds: list[float], processes: int) -> float:
    """Tasks handed out in order to the first free worker (what ``shards.workers`` does)."""
    free = [0.0] * processes
    for seconds in task_seconds:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(free)


def _runs(images: int, size: int) -> list[int]:
    return [min(size, images - start) for start in range(0, images, size)]


def project(costs: dict, processes: int, measured_on: int, shard_samples: int = 5000) -> dict:
    """A fresh ImageNet run on ``processes`` cores, from ``costs`` measured with ``measured_on`` workers."""
    total = sum(IMAGENET.values())
    runs = _runs(IMAGENET["train"], shard_samples) + _runs(IMAGENET["val"], shard_samples)
    workers = makespan([n * costs["worker_cpu_per_image"] for n in runs], processes)
    parent = total * costs["task_cpu_per_image"] + workers * costs["parent_cpu_per_second"] * processes / measured_on
    writing = max(workers, parent)
    statistics = makespan([n * costs["stats_cpu_per_image"] for n in _runs(20000, 128)], processes)
    scan_s = total * costs["scan_s_per_image"]
    seconds = scan_s + writing + statistics
    return {"cores": processes, "shard_samples": shard_samples, "scan_s": scan_s, "writing_s": writing,
            "statistics_s": statistics, "total_s": seconds, "images_per_s": total / seconds,
            "writer_share": parent / writing,
            "whole_shard_efficiency": total * costs["worker_cpu_per_image"] / processes / workers}
