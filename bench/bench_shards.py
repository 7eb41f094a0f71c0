"""``make bench-shards``: images/s of the sharder at 1, 2 and all cores, what its parent process
costs, and the projection for ImageNet at 8, 32 and 64 cores (``bench.shards_projection``).

For each process count: a full ``make shards`` run on the sample data (fresh output directory,
100-image shards as ``configs/shards-sample.toml``, the statistics over the same share of the
training split as ImageNet's default ``stats_images``) next to a **bare loop**: each file read,
decoded by PIL (draft mode for large JPEGs, as the sharder), resized + centre-cropped to 256,
encoded JPEG q90, one process per worker, nothing written.  Each number is the median of
``--repeat`` runs, the configurations interleaved run by run.

The **writer's share** is the parent's CPU time during the writing phase over that phase's wall
time: how busy the single process that publishes shards is.  Before issue 14 it received every
encoded image (the ceiling of a single writer); now it renames and journals finished shards.
CPU times are per process (``time.process_time`` in each worker), so they hold on a loaded
machine better than images/s do.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

from PIL import Image

from bench.charts import bars
from bench.inputs import report_arg, source_or_exit
from bench.record import finish, header
from bench.shards_projection import (
    IMAGENET, PROJECTED_CORES, imagenet_like_tree, project, scan_seconds_per_image, task_cpu_per_image,
)
from common.config_values import at_least_one
from shards.build import build
from shards.config import ShardConfig
from shards.phases import Phase, Phases

# ImageNet's default statistics sample (20,000 of 1,281,167 training images), as a share, so the
# statistics pass weighs on the small sample set as much as it does on the real dataset.
STATS_SHARE = 20000 / IMAGENET["train"]


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
        pool.close()  # the workers end on their own: the with's terminate() relies on SIGTERM
        pool.join()
    return time.perf_counter() - start


def sharder(src: Path, processes: int, stats_images: int) -> tuple[float, Phases]:
    """Seconds for a full ``make shards`` run (fresh output directory) and its phases."""
    out = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    phases = Phases()
    try:
        start = time.perf_counter()
        build(ShardConfig(src=src, out=out, workers=processes, shard_samples=100, stats_images=stats_images).validate(),
              phases)
        return time.perf_counter() - start, phases
    finally:
        shutil.rmtree(out)


def _phase(phases: Phases, name: str) -> Phase:
    return next(r for r in phases.records if r.name == name)


def costs_of(runs: list[Phases], images: int, stats_images: int) -> dict:
    """Median per-image CPU costs, and the parent's CPU per second of writing (= the writer's share)."""
    def median(values) -> float:  # noqa: ANN001
        return statistics.median(list(values))
    writing = [_phase(p, "writing") for p in runs]
    return {"worker_cpu_per_image": median(w.worker_cpu / images for w in writing),
            "parent_cpu_per_image": median(w.parent_cpu / images for w in writing),
            "writer_share": median(w.parent_cpu / w.seconds for w in writing),
            "writing_s": median(w.seconds for w in writing),
            "stats_cpu_per_image": median(_phase(p, "statistics").worker_cpu / stats_images for p in runs)}


def measure(src: Path, files: list[str], counts: list[int], repeat: int) -> dict:
    """Interleaved runs of the bare loop and the sharder at each process count."""
    stats_images = max(1, round(sum(1 for f in files if "/train/" in f) * STATS_SHARE))
    rates: dict[str, list[float]] = {}
    phases: dict[int, list[Phases]] = {n: [] for n in counts}
    for _ in range(repeat):  # interleaved, so that load from other jobs hits all alike
        for n in counts:
            rates.setdefault(f"bare_{n}", []).append(len(files) / bare_loop(files, n))
            seconds, run = sharder(src, n, stats_images)
            rates.setdefault(f"shards_{n}", []).append(len(files) / seconds)
            phases[n].append(run)
    return {"runs": rates, "medians": {k: statistics.median(v) for k, v in rates.items()},
            "costs": {n: costs_of(p, len(files), stats_images) for n, p in phases.items()}}


def projection_costs(src: Path, files: list[str], measured: dict, scan_images: int) -> dict:
    """The costs ``project`` needs: the all-cores run's, the parent split into per image and per second."""
    costs = dict(measured)
    costs["task_cpu_per_image"] = task_cpu_per_image()
    # What the parent spends per second of writing once the per-image task cost is taken out.
    task_share = costs["task_cpu_per_image"] * len(files) / costs["writing_s"]
    costs["parent_cpu_per_second"] = max(0.0, costs["writer_share"] - task_share)
    with imagenet_like_tree(files, scan_images, src) as tree:
        costs["scan_s_per_image"] = scan_seconds_per_image(tree, scan_images)
    return costs


def _table(results: dict, counts: list[int]) -> None:
    med, costs, c = results["medians"], results["costs"], results["projection_costs"]
    print(f"\n{'':>24}" + "".join(f"{f'{n} process(es)':>16}" for n in counts))
    print(f"{'bare loop, images/s':>24}" + "".join(f"{med[f'bare_{n}']:>16.0f}" for n in counts))
    print(f"{'make shards, images/s':>24}" + "".join(f"{med[f'shards_{n}']:>16.0f}" for n in counts))
    print(f"{'writer share':>24}" + "".join(f"{costs[n]['writer_share']:>16.2%}" for n in counts))
    print(f"{'worker CPU ms/image':>24}" + "".join(f"{1e3 * costs[n]['worker_cpu_per_image']:>16.2f}" for n in counts))
    print(f"{'parent CPU us/image':>24}" + "".join(f"{1e6 * costs[n]['parent_cpu_per_image']:>16.1f}" for n in counts))
    print(f"\nprojection costs: worker {1e3 * c['worker_cpu_per_image']:.2f} ms/image, statistics "
          f"{1e3 * c['stats_cpu_per_image']:.2f} ms/image; parent: tasks {1e6 * c['task_cpu_per_image']:.2f} us/image "
          f"+ {1e3 * c['parent_cpu_per_second']:.2f} ms per second of writing; scan + shuffle "
          f"{1e6 * c['scan_s_per_image']:.1f} us/image")
    print(f"ImageNet ({sum(IMAGENET.values()):,} images), projected:")
    for p in results["projection"]:
        print(f"  {p['cores']:>2} cores: {p['total_s']:5.0f} s ({p['images_per_s']:6.0f} images/s; "
              f"scan {p['scan_s']:.0f} s, writing {p['writing_s']:.0f} s, statistics {p['statistics_s']:.1f} s; writer share "
              f"{p['writer_share']:.1%}, whole-shard efficiency {p['whole_shard_efficiency']:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=Path("data/sample"))
    parser.add_argument("--report", type=report_arg, default=Path("bench/shards.json"))
    parser.add_argument("--repeat", type=at_least_one(), default=5)
    parser.add_argument("--scan-images", type=at_least_one(), default=100_000, help="hard links scanned for the scan cost")
    args = parser.parse_args()
    source_or_exit("bench_shards", args.src)
    files = sorted(str(p) for p in args.src.rglob("*.JPEG"))
    results = header("make shards vs a bare decode+resize+encode loop; per-image costs; ImageNet projection",
                     "pillow")
    cores = results["machine"]["cpu_cores"]  # a container's cpuset, as make shards --workers 0
    counts = sorted({1, 2, cores})
    results |= {"images": len(files), "repeat": args.repeat, "stats_images_share": STATS_SHARE,
                "scan_images": args.scan_images}
    results |= measure(args.src, files, counts, args.repeat)
    results["projection_costs"] = projection_costs(args.src, files, results["costs"][cores], args.scan_images)
    results["projection"] = [project(results["projection_costs"], n, cores) for n in PROJECTED_CORES]
    results["projection"].append(project(results["projection_costs"], 64, cores, shard_samples=2500))
    finish(results)
    _table(results, counts)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(results, indent=2) + "\n")
    names = {f"{kind}, {n} process(es)": f"{key}_{n}" for n in counts
             for kind, key in (("bare loop", "bare"), ("make shards", "shards"))}
    bars(args.report.with_suffix(".png"), {name: results["medians"][key] for name, key in names.items()}, "images / s",
         f"sample data ({len(files)} images), {cores} cores; writer's share at {cores}: "
         f"{results['costs'][cores]['writer_share']:.2%}", {name: results["runs"][key] for name, key in names.items()})
    print(f"wrote {args.report} and {args.report.with_suffix('.png')}")


if __name__ == "__main__":
    main()
