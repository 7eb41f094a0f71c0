"""``make bench-shards``: images/s of the sharder at 1, 2 and all cores, what its parent process
costs, and the projection for ImageNet at 8, 32 and 64 cores.

For each process count: a full ``make shards`` run on the sample data (fresh output directory,
100-image shards as ``configs/shards-sample.toml``, the statistics over the same share of the
training split as ImageNet's default ``stats_images``) next to a **bare loop**: each file read,
decoded by PIL (draft mode for large JPEGs, as the sharder), resized + centre-cropped to 256,
encoded JPEG q90, one process per worker, nothing written.  Each number is the median of
``--repeat`` runs, the configurations interleaved run by run.

The **writer's share** is the parent's CPU time during the writing phase over that phase's wall
time: how busy the single process that publishes shards is.  Before issue 14 it received every
encoded image (the ceiling of a single writer); now it renames and journals finished shards.
The **per-image CPU costs** (workers while writing, workers in the statistics, the parent, the
scan of a tree of ``--scan-images`` hard links to the sample files) feed ``project``.
"""
from __future__ import annotations

import argparse
import heapq
import io
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from multiprocessing import get_context
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from bench.charts import bars
from shards.build import Phases, build
from shards.config import ShardConfig

# ImageNet's default statistics sample (20,000 of 1,281,167 training images), as a share, so the
# statistics pass weighs on the small sample set as much as it does on the real dataset.
IMAGENET = {"train": 1_281_167, "val": 50_000}
STATS_SHARE = 20000 / IMAGENET["train"]
PROJECTED_CORES = (8, 32, 64)


def _bare(path: str) -> int:
    img = Image.open(path)
    if img.format == "JPEG" and min(img.size) >= 512:
        img.draft("RGB", (256, 256))
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    buf = io.BytesIO()
    img.resize((256, 256), Image.BICUBIC, box=box).save(buf, "JPEG", quality=90)
    return len(buf.getvalue())


def bare_loop(files: list[str], processes: int) -> float:
    """Seconds for the bare loop over ``files``."""
    start = time.perf_counter()
    with get_context("fork").Pool(processes) as pool:
        pool.map(_bare, files, chunksize=8)
    return time.perf_counter() - start


def sharder(src: Path, processes: int, **settings: int) -> tuple[float, Phases]:
    """Seconds for a full ``make shards`` run (fresh output directory) and its phases."""
    out = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    phases = Phases()
    try:
        start = time.perf_counter()
        build(ShardConfig(src=src, out=out, workers=processes, **settings).validate(), phases)
        return time.perf_counter() - start, phases
    finally:
        shutil.rmtree(out)


@contextmanager
def link_tree(files: list[str], src: Path, count: int) -> Iterator[Path]:
    """A dataset of ``count`` hard links to the sample files, for costs measured at a larger scale."""
    root = Path(tempfile.mkdtemp(prefix="bench-links-"))
    try:
        for i in range(count):
            original = Path(files[i % len(files)])
            link = root / original.relative_to(src).parent / f"{i:07d}.JPEG"
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(original, link)
        yield root
    finally:
        shutil.rmtree(root)


def makespan(task_seconds: list[float], processes: int) -> float:
    """Tasks handed out in order to the first free worker (what ``shards.workers`` does)."""
    free = [0.0] * processes
    for seconds in task_seconds:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(free)


def _runs(images: int, size: int) -> list[int]:
    return [min(size, images - start) for start in range(0, images, size)]


def project(costs: dict, processes: int, shard_samples: int = 5000, stats_images: int = 20000,
            chunk: int = 128) -> dict:
    """Seconds of a fresh ImageNet run on ``processes`` cores from per-image costs measured here."""
    total = sum(IMAGENET.values())
    runs = _runs(IMAGENET["train"], shard_samples) + _runs(IMAGENET["val"], shard_samples)
    workers_s = makespan([n * costs["worker_cpu_per_image"] for n in runs], processes)
    parent_s = total * costs["parent_cpu_per_image"]
    writing = max(workers_s, parent_s)
    stats_s = makespan([n * costs["stats_cpu_per_image"] for n in _runs(stats_images, chunk)], processes)
    scan_s = total * costs["scan_s_per_image"]
    seconds = scan_s + writing + stats_s
    return {"cores": processes, "scan_s": scan_s, "writing_s": writing, "statistics_s": stats_s, "total_s": seconds,
            "images_per_s": total / seconds, "writer_share": parent_s / writing,
            "whole_shard_efficiency": total * costs["worker_cpu_per_image"] / processes / workers_s}


def _phase(phases: Phases, name: str):  # noqa: ANN202 (a shards.build.Phase)
    return next(r for r in phases.records if r.name == name)


def costs_of(runs: list[Phases], images: int, stats_images: int) -> dict:
    """Median per-image CPU costs, and the writer's share, over runs."""
    def median(values) -> float:  # noqa: ANN001
        return statistics.median(list(values))
    return {"worker_cpu_per_image": median(_phase(p, "writing").worker_cpu / images for p in runs),
            "parent_cpu_per_image": median(_phase(p, "writing").parent_cpu / images for p in runs),
            "stats_cpu_per_image": median(_phase(p, "statistics").worker_cpu / stats_images for p in runs),
            "writer_share": median(_phase(p, "writing").parent_cpu / _phase(p, "writing").seconds for p in runs)}


def costs_run(tree: Path, images: int, processes: int) -> dict:
    """Per-image costs of one run with ImageNet's settings (5,000-image shards) over ``tree``.

    At the sample's 840 images the parent's fixed costs (starting workers, the progress bar)
    would pass for per-image ones; at 20,000 they are amortised as on ImageNet.
    """
    stats_images = 5000
    seconds, phases = sharder(tree, processes, stats_images=stats_images)
    costs = costs_of([phases], images, stats_images)
    costs["scan_s_per_image"] = (_phase(phases, "scan").seconds + _phase(phases, "resume check").seconds) / images
    costs["images_per_s"] = images / seconds
    return costs


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def measure(src: Path, files: list[str], counts: list[int], repeat: int) -> dict:
    """Interleaved runs of the bare loop and the sharder at each process count."""
    stats_images = max(1, round(sum(1 for f in files if "/train/" in f) * STATS_SHARE))
    rates: dict[str, list[float]] = {}
    phases: dict[int, list[Phases]] = {n: [] for n in counts}
    for _ in range(repeat):  # interleaved, so that load from other jobs hits all alike
        for n in counts:
            rates.setdefault(f"bare_{n}", []).append(len(files) / bare_loop(files, n))
            seconds, run = sharder(src, n, shard_samples=100, stats_images=stats_images)
            rates.setdefault(f"shards_{n}", []).append(len(files) / seconds)
            phases[n].append(run)
    return {"runs": rates, "medians": {k: statistics.median(v) for k, v in rates.items()},
            "costs": {n: costs_of(p, len(files), stats_images) for n, p in phases.items()}}


def _table(results: dict, counts: list[int]) -> None:
    med, costs = results["medians"], results["costs"]
    print(f"\n{'':>24}" + "".join(f"{f'{n} process(es)':>16}" for n in counts))
    print(f"{'bare loop, images/s':>24}" + "".join(f"{med[f'bare_{n}']:>16.0f}" for n in counts))
    print(f"{'make shards, images/s':>24}" + "".join(f"{med[f'shards_{n}']:>16.0f}" for n in counts))
    print(f"{'writer share':>24}" + "".join(f"{costs[n]['writer_share']:>16.1%}" for n in counts))
    print(f"{'worker CPU ms/image':>24}" + "".join(f"{1e3 * costs[n]['worker_cpu_per_image']:>16.2f}" for n in counts))
    print(f"{'parent CPU us/image':>24}" + "".join(f"{1e6 * costs[n]['parent_cpu_per_image']:>16.1f}" for n in counts))
    c = results["projection_costs"]
    print(f"\ncosts over {results['cost_images']} images (hard links to the sample), {max(counts)} processes: "
          f"worker {1e3 * c['worker_cpu_per_image']:.2f} ms/image, parent {1e6 * c['parent_cpu_per_image']:.1f} "
          f"us/image, statistics {1e3 * c['stats_cpu_per_image']:.2f} ms/image, scan+order "
          f"{1e6 * c['scan_s_per_image']:.1f} us/image, writer share {c['writer_share']:.1%}")
    print("ImageNet (1,331,167 images), projected:")
    for p in results["projection"]:
        print(f"  {p['cores']:>2} cores: {p['total_s']:6.0f} s ({p['images_per_s']:7.0f} images/s; scan {p['scan_s']:.0f} s, "
              f"writing {p['writing_s']:.0f} s, statistics {p['statistics_s']:.1f} s, writer share "
              f"{p['writer_share']:.1%}, whole-shard efficiency {p['whole_shard_efficiency']:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("data/sample"))
    parser.add_argument("--report", type=Path, default=Path("bench/shards.json"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cost-images", type=int, default=20_000)
    args = parser.parse_args()
    files = sorted(str(p) for p in args.src.rglob("*.JPEG"))
    cores = os.cpu_count() or 1
    counts = sorted({1, 2, cores})
    import PIL

    results: dict = {
        "benchmark": "make shards vs a bare decode+resize+encode loop; per-image costs; ImageNet projection",
        "images": len(files), "repeat": args.repeat, "stats_images_share": STATS_SHARE,
        "cost_images": args.cost_images,
        "machine": {"cpus": cores, "cpu": _cpu_name(), "python": platform.python_version(),
                    "pillow_simd": PIL.__version__, "load_average_start": os.getloadavg()[0]},
    }
    results |= measure(args.src, files, counts, args.repeat)
    with link_tree(files, args.src, args.cost_images) as tree:
        results["projection_costs"] = costs_run(tree, args.cost_images, cores)
    results["projection"] = [project(results["projection_costs"], n) for n in PROJECTED_CORES]
    results["machine"]["load_average_end"] = os.getloadavg()[0]
    _table(results, counts)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(results, indent=2) + "\n")
    values = {f"{kind}, {n} process(es)": results["medians"][f"{key}_{n}"]
              for n in counts for kind, key in (("bare loop", "bare"), ("make shards", "shards"))}
    runs = {f"{kind}, {n} process(es)": results["runs"][f"{key}_{n}"]
            for n in counts for kind, key in (("bare loop", "bare"), ("make shards", "shards"))}
    bars(args.report.with_suffix(".png"), values, "images / s",
         f"sample data ({len(files)} images), {cores} cores; writer share at {cores}: "
         f"{results['costs'][cores]['writer_share']:.1%}", runs)
    print(f"wrote {args.report} and {args.report.with_suffix('.png')}")


if __name__ == "__main__":
    main()
