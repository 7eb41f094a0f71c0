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
2. ``reference``: the plain-PyTorch loader (webdataset + Pillow-SIMD + DataLoader workers).
3. ``decode_floor``: decoding the same JPEG bytes (held in memory) to RGB with Pillow-SIMD, no
   augmentation, one process per core.  Also reported: DALI's own decode-only pipeline (reader +
   CPU decoder, all cores).
4. ``scaling``: the pipeline with 1 thread and with all cores.
5. ``mixed``: the GPU decode path (``device="mixed"``), only when a GPU is present.

Also: the normaliser alone on the CPU, ms per batch (random uint8 crops, same batch size).
``ratio`` = pipeline / decode_floor (the issue's target: >= 0.9); ``ratio_fast_idct`` and
``ratio_with_cpu_normalize`` likewise for those two.
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
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from pipeline import LoaderConfig, build_train_loader
from pipeline.reference import build_reference_loader
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
        while True:
            done = pool.map(_pil_decode, range(processes), chunksize=1)
            _CHILD_CPU[0] += sum(cpu for _, cpu in done)
            yield sum(n for n, _ in done)


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
            "load_average_at_end": os.getloadavg()}  # "at_start" is added by main()


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
    if args.configs == "gpu-check":
        return runs, cpu
    cfg = LoaderConfig(batch_size=args.batch, threads=len(os.sched_getaffinity(0)), seed=0)
    reference = batch_sizes(build_reference_loader(args.shards, config=cfg))
    # (its CPU time is in its DataLoader workers, not measured)
    runs["reference"] = [rate(reference, args.images, args.warmup if r == 0 else 0)[0] for r in range(args.repeat)]
    return runs, cpu


LABELS = {
    "pipeline": "(1) DALI pipeline up to the uint8 batch (GPU service path)",
    "pipeline_fast_idct": "(1') the same with the fast IDCT (fast_idct=True)",
    "pipeline_with_cpu_normalize": "(1b) (1) + normaliser on this CPU (CPU-only)",
    "reference": "(2) reference loader (webdataset + Pillow-SIMD + DataLoader)",
    "decode_floor": "(3) decode floor: Pillow-SIMD decode, 1 process per core",
    "dali_decode_only": "    DALI decode only (reader + CPU decoder), all cores",
    "pipeline_1_thread": "(4) DALI pipeline up to the uint8 batch, 1 thread",
    "pipeline_mixed": "(5) DALI pipeline, mixed (GPU) decode, uint8 batch",
    "pipeline_mixed_with_gpu_normalize": "(5b) the same + normaliser on the GPU",
    "dali_decode_only_mixed": "    DALI decode only, mixed (GPU)",
}


def _ratio(med: dict[str, float], a: str, b: str) -> float | None:
    return med[a] / med[b] if a in med and b in med else None


def report(runs: dict[str, list[float]], normalize_ms: dict[str, float], args: argparse.Namespace) -> dict:
    """The JSON record: machine, versions, medians, every run, and the ratios (None where a
    configuration was not measured)."""
    med = {k: statistics.median(v) for k, v in runs.items()}
    cores = len(os.sched_getaffinity(0))
    return {
        "machine": machine(),
        "shards": str(Path(args.shards).resolve()),
        "settings": {"batch_size": args.batch, "images_per_run": args.images, "repeat": args.repeat,
                     "warmup_batches": args.warmup, "interleaved": True, "dtype": "float32",
                     "normalize": "mean_image", "fast_idct": LoaderConfig().fast_idct, "configs": args.configs},
        "pipeline_definition": "DALI graph (read, crop-window decode, flip, draws) + loader up to the uint8 "
                               "NHWC batch handed to the device normaliser (raw_batches), all cores",
        "decode_floor_definition": "Pillow-SIMD decode of the same training JPEG bytes (in memory) to RGB, "
                                   f"no augmentation, {cores} processes (one per core)",
        "pipeline_images_per_s": med.get("pipeline"),
        "decode_floor_images_per_s": med.get("decode_floor"),
        "ratio": _ratio(med, "pipeline", "decode_floor"),
        "pipeline_fast_idct_images_per_s": med.get("pipeline_fast_idct"),
        "ratio_fast_idct": _ratio(med, "pipeline_fast_idct", "decode_floor"),
        "pipeline_with_cpu_normalize_images_per_s": med.get("pipeline_with_cpu_normalize"),
        "ratio_with_cpu_normalize": _ratio(med, "pipeline_with_cpu_normalize", "decode_floor"),
        "ratio_vs_dali_decode_only": _ratio(med, "pipeline", "dali_decode_only"),
        "reference_images_per_s": med.get("reference"),
        "dali_decode_only_images_per_s": med.get("dali_decode_only"),
        "normalizer_cpu_ms_per_batch": normalize_ms,
        "scaling": {"1_thread": med.get("pipeline_1_thread"), f"{cores}_threads": med.get("pipeline"),
                    "speedup": _ratio(med, "pipeline", "pipeline_1_thread")},
        "mixed_images_per_s": med.get("pipeline_mixed"),
        "mixed_with_gpu_normalize_images_per_s": med.get("pipeline_mixed_with_gpu_normalize"),
        "mixed_decode_only_images_per_s": med.get("dali_decode_only_mixed"),
        "runs": runs,
    }


def ordered(runs: dict[str, list[float]]) -> list[str]:
    """The measured configurations in the order of ``LABELS``."""
    return [k for k in LABELS if k in runs]


def print_table(record: dict, runs: dict[str, list[float]]) -> None:
    print(f"{'configuration':<64} {'images/s':>9}  runs")
    for key in ordered(runs):
        values = runs[key]
        print(f"{LABELS[key]:<64} {statistics.median(values):>9.0f}  {', '.join(f'{v:.0f}' for v in values)}")
    print("CPU us per image (all threads/processes): "
          + ", ".join(f"{k} {v:.0f}" for k, v in record["cpu_us_per_image"].items()))
    ms = record["normalizer_cpu_ms_per_batch"]
    ratios = {"(1)/(3)": record["ratio"], "(1')/(3)": record["ratio_fast_idct"],
              "(1b)/(3)": record["ratio_with_cpu_normalize"], "(1)/DALI decode only": record["ratio_vs_dali_decode_only"],
              f"scaling 1 -> {record['machine']['cores']} threads": record["scaling"]["speedup"]}
    print("   ".join(f"{k} = {v:.2f}" for k, v in ratios.items() if v is not None))
    print(f"normaliser alone on this CPU, batch {record['settings']['batch_size']}: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))


def chart(runs: dict[str, list[float]], path: Path) -> None:
    """A horizontal bar chart of the medians (with every run as a dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ordered(runs)[::-1]
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
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=8, help="untimed batches before the first run")
    parser.add_argument("--configs", choices=["all", "gpu-check"], default="all",
                        help="gpu-check: the GPU path and the CPU decode it is compared with")
    args = parser.parse_args(list(argv) if argv is not None else None)
    load(args.shards)  # fail early, with the fix, if the shards are not there
    load_at_start = os.getloadavg()
    runs, cpu = measure_all(args)
    normalize_ms = {"reused_output": normalizer_ms(args.shards, args.batch),
                    "fresh_output": normalizer_ms(args.shards, args.batch, reuse=False)}
    record = report(runs, normalize_ms, args)
    record["cpu_us_per_image"] = {k: statistics.median(v) for k, v in cpu.items()}
    record["cpu_runs"] = cpu
    record["machine"]["load_average_at_start"] = load_at_start
    print_table(record, runs)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(record, indent=2) + "\n")
    chart(runs, args.report.with_suffix(".png"))
    print(f"wrote {args.report} and {args.report.with_suffix('.png')}")
    return record


if __name__ == "__main__":
    main()
