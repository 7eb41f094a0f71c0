"""``make bench-shards``: images/s of the sharder next to a bare decode+resize+encode loop.

The bare loop is the floor of the work itself: read each file, decode it with PIL (draft
mode for large JPEGs, as the sharder does), resize + centre-crop to 256, encode JPEG q90,
one process per core, nothing else.  The sharder adds scanning, ordering, tar writing,
hashing, journaling and the statistics pass (over the same share of the training split as
ImageNet's default ``stats_images``).  Each number is the median of ``--repeat`` runs, the
configurations interleaved run by run.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

from PIL import Image

from shards.build import build
from shards.config import ShardConfig


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


# ImageNet's default statistics sample (20,000 of 1,281,167 training images), as a share, so the
# statistics pass weighs on the small sample set as much as it does on the real dataset.
STATS_SHARE = 20000 / 1281167


def sharder(src: Path, processes: int, train_images: int) -> float:
    """Seconds for a full ``make shards`` run (fresh output directory)."""
    out = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    stats_images = max(1, round(train_images * STATS_SHARE))
    try:
        start = time.perf_counter()
        build(ShardConfig(src=src, out=out, workers=processes, shard_samples=100, stats_images=stats_images).validate())
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["bare loop", "make shards"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, procs in enumerate(("1", "all")):
        vals = [results[f"bare_{procs}"], results[f"shards_{procs}"]]
        ax.bar([x + 0.38 * i for x in range(2)], vals, width=0.36, label=f"{procs} process(es)")
    ax.set_xticks([x + 0.19 for x in range(2)], labels)
    ax.set_ylabel("images / s")
    ax.set_title(f"sharding throughput, {results['machine']['cpus']} cores")
    ax.legend(loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("data/sample"))
    parser.add_argument("--report", type=Path, default=Path("bench/shards.json"))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    files = sorted(str(p) for p in args.src.rglob("*.JPEG"))
    cores = os.cpu_count() or 1
    train = sum(1 for f in files if "/train/" in f)
    import PIL

    results: dict = {
        "benchmark": "make shards vs a bare decode+resize+encode loop",
        "images": len(files), "repeat": args.repeat, "stats_images_share": STATS_SHARE,
        "machine": {"cpus": cores, "cpu": _cpu_name(), "python": platform.python_version(),
                    "pillow_simd": PIL.__version__, "load_average_start": os.getloadavg()[0]},
    }
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeat):  # interleaved, so that load from other jobs hits all alike
        for procs, n in (("1", 1), ("all", cores)):
            runs.setdefault(f"bare_{procs}", []).append(len(files) / bare_loop(files, n))
            runs.setdefault(f"shards_{procs}", []).append(len(files) / sharder(args.src, n, train))
    results |= {name: statistics.median(rates) for name, rates in runs.items()}
    results["runs"] = runs
    results["ratio_all"] = results["shards_all"] / results["bare_all"]
    results["ratio_1"] = results["shards_1"] / results["bare_1"]
    results["scaling"] = results["shards_all"] / results["shards_1"]
    results["machine"]["load_average_end"] = os.getloadavg()[0]
    print(f"\n{'images/s':>22} {'1 process':>10} {f'{cores} processes':>13}")
    for name in ("bare", "shards"):
        print(f"{name + (' loop' if name == 'bare' else ' (make shards)'):>22} "
              f"{results[f'{name}_1']:>10.0f} {results[f'{name}_all']:>13.0f}")
    print(f"make shards / bare loop: {results['ratio_1']:.2f}x (1 process), {results['ratio_all']:.2f}x ({cores}); "
          f"scaling 1 -> {cores}: {results['scaling']:.2f}x  (target >= 0.8x of the bare loop)")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, args.report.with_suffix(".png"))
    print(f"wrote {args.report} and {args.report.with_suffix('.png')}")


if __name__ == "__main__":
    main()
