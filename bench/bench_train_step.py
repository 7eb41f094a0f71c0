"""Training-step rate fed two ways: ``model-only`` (one batch already on the device, reused) and
``loader-fed`` (each batch from the DALI training loader, as the service trains), so a change to
the loader's hand-over (e.g. where the draws and labels are copied) shows in the second number
and not in the first.

    .venv/bin/python -m bench.bench_train_step --shards data/shards --report bench/train_step.json

Both run the grouped layout at the same batch size, interleaved over ``--repeat`` rounds (load
from other jobs hits them alike); the loader-fed rate includes the time spent waiting for data.
Prints a table, writes the JSON record and a PNG next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.charts import bars
from bench.inputs import device_arg, report_arg, shards_or_exit
from bench.record import finish, header
from common.config_values import at_least_one
from model import AlexNet, PaperSGD, train_step
from pipeline import LoaderConfig, build_train_loader
from shards.config import ShardConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def endless(loader):
    """(images, labels) from ``loader``, epoch after epoch."""
    while True:
        yield from loader


def timed(steps: int, batches, model, opt, device: torch.device, autocast) -> float:
    """images/s of ``steps`` train steps on ``batches``."""
    _sync(device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(batches)
        train_step(model, opt, x, y, autocast_dtype=autocast)
        images += len(y)
    _sync(device)
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, default=ShardConfig.out)
    p.add_argument("--report", type=report_arg, default=Path("bench/train_step.json"))
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=at_least_one(), default=32)
    p.add_argument("--steps", type=at_least_one(), default=8, help="timed steps per run")
    p.add_argument("--repeat", type=at_least_one(), default=3)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    manifest = shards_or_exit("bench_train_step", args.shards)
    record = header("train step, model-only vs loader-fed")
    autocast = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    model = AlexNet(manifest.num_classes, bias_init=0.1).to(device)
    opt = PaperSGD(model.parameters())
    loader = build_train_loader(args.shards, device=device, config=LoaderConfig(batch_size=args.batch))
    fed = endless(loader)
    fixed = next(fed)
    same = iter(lambda: fixed, None)  # the one batch, forever
    timed(2, fed, model, opt, device, autocast)  # warm-up: pipeline start, first allocations
    runs: dict[str, list[float]] = {"model-only": [], "loader-fed": []}
    for r in range(args.repeat):
        for name, batches in (("model-only", same), ("loader-fed", fed)):
            runs[name].append(timed(args.steps, batches, model, opt, device, autocast))
            print(f"round {r + 1}/{args.repeat} {name}: {runs[name][-1]:.1f} images/s", flush=True)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    print(f"{'fed by':<12} {'images/s':>9}  runs   (batch {args.batch}, {device}, load {os.getloadavg()[0]:.1f})")
    for k, v in runs.items():
        print(f"{k:<12} {medians[k]:>9.1f}  {', '.join(f'{x:.1f}' for x in v)}")
    finish(record).update({"device": str(device), "batch": args.batch, "steps_per_run": args.steps,
                           "repeat": args.repeat, "images_per_s": medians, "runs": runs,
                           "loader_fed_share_of_model_only": medians["loader-fed"] / medians["model-only"]})
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(record, indent=2) + "\n")
    bars(args.report.with_suffix(".png"), medians, "training images/s", f"train step, batch {args.batch}, {device}",
         runs)
    print(f"wrote {args.report} and {args.report.with_suffix('.png')}")
    return record


if __name__ == "__main__":
    main()
