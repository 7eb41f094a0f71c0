"""``make bench-pipeline``: images/s of the DALI training pipeline next to the JPEG decode floor.

Measured, each as the median of ``--repeat`` timed runs of ``--images`` images, after a warm-up
(pipeline build, thread start, shuffle-buffer fill and the first batches are never timed):

1. ``pipeline``: the DALI training loader exactly as the service builds it
   (``pipeline.build_train_loader``: decode, random crop, flip, PCA lighting, mean image,
   float32 NCHW torch tensors), all cores.
2. ``reference``: the plain-PyTorch loader (webdataset + Pillow-SIMD + DataLoader workers).
3. ``decode_floor``: decoding the same JPEG bytes (held in memory) to RGB with Pillow-SIMD, no
   augmentation, one process per core.  Also reported: DALI's own decode-only pipeline (reader +
   CPU decoder, all cores), the floor if one counts DALI's decoder instead of Pillow's.
4. ``scaling``: the pipeline with 1 thread and with all cores.
5. ``mixed``: the GPU decode path (``device="mixed"``), only when a GPU is present.

``ratio`` = pipeline / decode_floor (the issue's target on the CPU: >= 0.9).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tarfile
import time
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from pipeline import LoaderConfig, build_train_loader
from pipeline.reference import build_reference_loader
from shards.manifest import load


def batch_sizes(loader) -> Iterator[int]:
    """Sizes of the batches of ``loader``, epoch after epoch, forever."""
    while True:
        for batch in loader:
            yield len(batch[1])


def rate(stream: Iterator[int], images: int, repeat: int, warmup: int) -> list[float]:
    """images/s of ``repeat`` consecutive stretches of ``images`` images, after ``warmup`` batches."""
    for _ in islice(stream, warmup):
        pass
    rates = []
    for _ in range(repeat):
        start, done = time.perf_counter(), 0
        while done < images:
            done += next(stream)
        rates.append(done / (time.perf_counter() - start))
    return rates


def train_jpegs(shards: Path, limit: int) -> list[bytes]:
    """The first ``limit`` training JPEGs, as bytes."""
    out: list[bytes] = []
    for shard in load(shards, splits=("train",)).splits["train"].shards:
        with tarfile.open(shard.tar) as tar:
            out += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
        if len(out) >= limit:
            break
    return out[:limit]


def _pil_decode(jpegs: list[bytes]) -> int:
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").load()
    return len(jpegs)


def pil_floor(jpegs: list[bytes], processes: int, images: int, repeat: int) -> list[float]:
    """Pillow decode of the same bytes, one process per core (the pool starts before timing)."""
    rounds = max(1, images // len(jpegs))
    work = [jpegs[i::processes] * rounds for i in range(processes)]
    with get_context("fork").Pool(processes) as pool:
        pool.map(_pil_decode, [w[:16] for w in work])  # warm-up: imports, first allocations
        rates = []
        for _ in range(repeat):
            start = time.perf_counter()
            done = sum(pool.map(_pil_decode, work))
            rates.append(done / (time.perf_counter() - start))
    return rates


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


def machine() -> dict:
    """Where the numbers come from."""
    import nvidia.dali
    import PIL
    import webdataset

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "gpu": gpu, "platform": platform.platform(),
            "python": platform.python_version(), "dali": nvidia.dali.__version__, "torch": torch.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__, "webdataset": webdataset.__version__,
            "load_average_at_start": os.getloadavg()}


def measure_all(args: argparse.Namespace) -> dict[str, list[float]]:
    """Every configuration's images/s (a list of ``repeat`` runs each)."""
    cores = len(os.sched_getaffinity(0))
    cfg = LoaderConfig(batch_size=args.batch, threads=cores, seed=0)
    timed = lambda stream: rate(stream, args.images, args.repeat, args.warmup)  # noqa: E731
    runs: dict[str, list[float]] = {}
    runs["pipeline"] = timed(batch_sizes(build_train_loader(args.shards, config=cfg)))
    runs["reference"] = timed(batch_sizes(build_reference_loader(args.shards, config=cfg)))
    runs["decode_floor"] = pil_floor(train_jpegs(args.shards, 2048), cores, args.images, args.repeat)
    runs["dali_decode_only"] = timed(dali_decode_only(args.shards, cores, args.batch, "cpu"))
    runs["pipeline_1_thread"] = timed(batch_sizes(build_train_loader(args.shards, config=cfg.replace(threads=1))))
    if torch.cuda.is_available():
        gpu_cfg = cfg.replace(threads=min(cores, 8))
        runs["pipeline_mixed"] = timed(batch_sizes(build_train_loader(args.shards, device="cuda", config=gpu_cfg)))
        runs["dali_decode_only_mixed"] = timed(dali_decode_only(args.shards, gpu_cfg.num_threads, args.batch, "mixed"))
    return runs


LABELS = {
    "pipeline": "(1) DALI training pipeline, as the service uses it",
    "reference": "(2) reference loader (webdataset + Pillow-SIMD + DataLoader)",
    "decode_floor": "(3) decode floor: Pillow-SIMD decode, 1 process per core",
    "dali_decode_only": "    DALI decode only (reader + CPU decoder), all cores",
    "pipeline_1_thread": "(4) DALI training pipeline, 1 thread",
    "pipeline_mixed": "(5) DALI training pipeline, mixed (GPU) decode",
    "dali_decode_only_mixed": "    DALI decode only, mixed (GPU)",
}


def report(runs: dict[str, list[float]], args: argparse.Namespace) -> dict:
    """The JSON record: machine, versions, medians, every run, and the ratios."""
    med = {k: statistics.median(v) for k, v in runs.items()}
    cores = len(os.sched_getaffinity(0))
    return {
        "machine": machine(),
        "shards": str(Path(args.shards).resolve()),
        "settings": {"batch_size": args.batch, "images_per_run": args.images, "repeat": args.repeat,
                     "warmup_batches": args.warmup, "dtype": "float32", "normalize": "mean_image"},
        "decode_floor_definition": "Pillow-SIMD decode of the same training JPEG bytes (in memory) to RGB, "
                                   f"no augmentation, {cores} processes (one per core)",
        "pipeline_images_per_s": med["pipeline"],
        "decode_floor_images_per_s": med["decode_floor"],
        "ratio": med["pipeline"] / med["decode_floor"],
        "ratio_vs_dali_decode_only": med["pipeline"] / med["dali_decode_only"],
        "reference_images_per_s": med["reference"],
        "dali_decode_only_images_per_s": med["dali_decode_only"],
        "scaling": {"1_thread": med["pipeline_1_thread"], f"{cores}_threads": med["pipeline"],
                    "speedup": med["pipeline"] / med["pipeline_1_thread"]},
        "mixed_images_per_s": med.get("pipeline_mixed"),
        "mixed_decode_only_images_per_s": med.get("dali_decode_only_mixed"),
        "runs": runs,
    }


def print_table(record: dict, runs: dict[str, list[float]]) -> None:
    print(f"{'configuration':<64} {'images/s':>9}  runs")
    for key, values in runs.items():
        print(f"{LABELS[key]:<64} {statistics.median(values):>9.0f}  {', '.join(f'{v:.0f}' for v in values)}")
    print(f"ratio (1)/(3) = {record['ratio']:.2f}   (1)/DALI decode only = {record['ratio_vs_dali_decode_only']:.2f}"
          f"   scaling 1 -> {record['machine']['cores']} threads = {record['scaling']['speedup']:.2f}x")


def chart(runs: dict[str, list[float]], path: Path) -> None:
    """A horizontal bar chart of the medians (with every run as a dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(runs)[::-1]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(keys) + 1.2))
    ax.barh(range(len(keys)), [statistics.median(runs[k]) for k in keys], color="#4c72b0")
    for y, k in enumerate(keys):
        ax.plot(runs[k], [y] * len(runs[k]), "k.", ms=4)
    ax.set_yticks(range(len(keys)), [LABELS[k].strip() for k in keys], fontsize=8)
    ax.set_xlabel("images/s")
    ax.set_title("Input pipeline throughput (median of runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Iterable[str] | None = None) -> dict:
    """Run the benchmark; print the table; write REPORT (.json) and a PNG chart next to it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=Path, default=Path("data/shards"))
    parser.add_argument("--report", type=Path, default=Path("bench/pipeline.json"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=3072, help="images per timed run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=8, help="untimed batches before the first run")
    args = parser.parse_args(list(argv) if argv is not None else None)
    load(args.shards)  # fail early, with the fix, if the shards are not there
    runs = measure_all(args)
    record = report(runs, args)
    print_table(record, runs)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(record, indent=2) + "\n")
    chart(runs, args.report.with_suffix(".png"))
    print(f"wrote {args.report} and {args.report.with_suffix('.png')}")
    return record


if __name__ == "__main__":
    main()
