"""What ``make bench-pipeline`` reports: the JSON record (machine, settings, medians, ratios,
every run), the table it prints and the bar chart next to the JSON.

The record's keys are read by ``bench.gpu_parts`` and quoted in ``docs/benchmarks.md``: a
configuration that was not measured is reported as None, never left out.
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from pipeline import LoaderConfig


# "{pillow}": the Pillow that ran, Pillow-SIMD or plain (``labels``).
LABELS = {
    "pipeline": "(1) DALI pipeline up to the uint8 batch (GPU service path)",
    "pipeline_fast_idct": "(1') the same with the fast IDCT (fast_idct=True)",
    "pipeline_with_cpu_normalize": "(1b) (1) + normaliser on this CPU (CPU-only)",
    "reference": "(2) reference loader (webdataset + {pillow} + DataLoader)",
    "decode_floor": "(3) decode floor: {pillow} decode, 1 process per core",
    "dali_decode_only": "    DALI decode only (reader + CPU decoder), all cores",
    "pipeline_1_thread": "(4) DALI pipeline up to the uint8 batch, 1 thread",
    "pipeline_mixed": "(5) DALI pipeline, mixed (GPU) decode, uint8 batch",
    "pipeline_mixed_with_gpu_normalize": "(5b) the same + normaliser on the GPU",
    "dali_decode_only_mixed": "    DALI decode only, mixed (GPU)",
}


def labels(record: dict) -> dict[str, str]:
    """``LABELS`` naming the Pillow of ``record`` (``bench.record.pillow_name``): a plain Pillow's
    floor was labelled Pillow-SIMD, the faster decoder the issue's ratio is meant against."""
    pillow = record["machine"]["pillow_distribution"]
    return {key: text.format(pillow=pillow) for key, text in LABELS.items()}


def _ratio(med: dict[str, float], a: str, b: str) -> float | None:
    return med[a] / med[b] if a in med and b in med else None


def report(head: dict, runs: dict[str, list[float]], normalize_ms: dict[str, float],
           args: argparse.Namespace) -> dict:
    """The JSON record: the header ``bench.record.header`` gave (machine, versions, load),
    settings, medians, every run, and the ratios (None where a configuration was not measured)."""
    med = {k: statistics.median(v) for k, v in runs.items()}
    cores = len(os.sched_getaffinity(0))
    return {
        **head,
        "shards": str(Path(args.shards).resolve()),
        "settings": {"batch_size": args.batch, "images_per_run": args.images, "repeat": args.repeat,
                     "warmup_batches": args.warmup, "interleaved": True, "dtype": "float32",
                     "normalize": "mean_image", "fast_idct": LoaderConfig().fast_idct, "configs": args.configs},
        "pipeline_definition": "DALI graph (read, crop-window decode, flip, draws) + loader up to the uint8 "
                               "NHWC batch handed to the device normaliser (raw_batches), all cores",
        "decode_floor_definition": f"{head['machine']['pillow_distribution']} {head['machine']['pillow']} decode "
                                   "of the same training JPEG bytes (in memory) to RGB, "
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
    names = labels(record)
    print(f"{'configuration':<64} {'images/s':>9}  runs")
    for key in ordered(runs):
        values = runs[key]
        print(f"{names[key]:<64} {statistics.median(values):>9.0f}  {', '.join(f'{v:.0f}' for v in values)}")
    print("CPU us per image (all threads/processes): "
          + ", ".join(f"{k} {v:.0f}" for k, v in record["cpu_us_per_image"].items()))
    ms = record["normalizer_cpu_ms_per_batch"]
    ratios = {"(1)/(3)": record["ratio"], "(1')/(3)": record["ratio_fast_idct"],
              "(1b)/(3)": record["ratio_with_cpu_normalize"], "(1)/DALI decode only": record["ratio_vs_dali_decode_only"],
              f"scaling 1 -> {record['machine']['cpu_cores']} threads": record["scaling"]["speedup"]}
    print("   ".join(f"{k} = {v:.2f}" for k, v in ratios.items() if v is not None))
    print(f"normaliser alone on this CPU, batch {record['settings']['batch_size']}: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))


def chart(record: dict, runs: dict[str, list[float]], path: Path) -> None:
    """A horizontal bar chart of the medians (with every run as a dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ordered(runs)[::-1]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(keys) + 1.2))
    ax.barh(range(len(keys)), [statistics.median(runs[k]) for k in keys], color="#4c72b0")
    for y, k in enumerate(keys):
        ax.plot(runs[k], [y] * len(runs[k]), "k.", ms=4)
    names = labels(record)
    ax.set_yticks(range(len(keys)), [names[k].strip() for k in keys], fontsize=8)
    ax.set_xlabel("images/s")
    ax.set_title("Input pipeline throughput (median of runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
