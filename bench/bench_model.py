"""Training throughput of the model: images/s of one train_step (forward, backward, PaperSGD
update) at batch 128, for both layouts, on synthetic data already on the device.  The update's lr
is the paper's scaled to ``--batch`` (``bench.scaled_lr``): at 0.01 a small batch diverged to nan
within the warm-up, and the configuration failed on its non-finite loss.

CPU: fp32, with the share of this CPU's measured fp32 matmul rate. GPU (used whenever
``torch.cuda.is_available()``): fp32 and bf16 autocast, channels_last or not, compiled or not,
with the share of the card's measured bf16 matmul rate. The towers layout uses cuda:0 and cuda:1
when there are two GPUs, else cuda:0 twice.

    .venv/bin/python -m bench.bench_model --report bench/model.json

writes the JSON record and a bar chart next to it (bench/model.png), and prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import time
from pathlib import Path

import torch

from bench.inputs import device_arg, report_arg
from bench.record import finish, header, where
from bench.scaled_lr import bench_lr
from common.config_values import at_least_one
from model import AlexNet, PaperSGD, prepare_model, train_step

TRAIN_FLOP_PER_IMAGE = 4.3e9  # SPEC 1: ~1.45 GFLOP forward, about 3x that for a training step


@dataclasses.dataclass(frozen=True)
class Config:
    layout: str  # "grouped" | "towers"
    precision: str  # "fp32" | "bf16" (autocast)
    channels_last: bool
    compiled: bool
    lrn_fp32: bool = True  # False: LRN in the autocast dtype (to measure what float32 LRN costs)

    @property
    def label(self) -> str:
        extras = [x for x, on in (("channels_last", self.channels_last), ("compiled", self.compiled),
                                  ("LRN in bf16", self.precision == "bf16" and not self.lrn_fp32)) if on]
        return " ".join([self.layout, self.precision, *extras])


# ``--grid short`` (what ``make gpu-check`` runs): the fast path, one change at a time from it.
SHORT_GRID = [
    Config("grouped", "bf16", True, False),
    Config("grouped", "bf16", True, True),
    Config("grouped", "bf16", False, False),
    Config("grouped", "bf16", True, False, lrn_fp32=False),
    Config("grouped", "fp32", True, False),
    Config("towers", "bf16", True, False),
    Config("towers", "fp32", True, False),
]


@dataclasses.dataclass
class Result:
    config: Config
    devices: list[str]
    images_per_s: float | None = None
    step_ms: float | None = None
    model_tflops: float | None = None
    share_of_matmul_peak: float | None = None
    error: str | None = None


def _devices(layout: str, device: torch.device) -> tuple[torch.device, torch.device]:
    if device.type == "cuda" and layout == "towers" and torch.cuda.device_count() >= 2:
        return torch.device("cuda:0"), torch.device("cuda:1")
    return device, device


def _sync(devices) -> None:
    for d in {d for d in devices if d.type == "cuda"}:
        torch.cuda.synchronize(d)


def time_config(config: Config, device: torch.device, batch: int, warmup: int, iters: int) -> Result:
    """Build a fresh model for ``config`` and time ``iters`` train steps after ``warmup`` ones."""
    devices = _devices(config.layout, device)
    result = Result(config, [str(d) for d in (devices if config.layout == "towers" else devices[:1])])
    try:
        torch.manual_seed(0)
        if config.layout == "towers":
            model = AlexNet(layout="towers", devices=devices, lrn_fp32=config.lrn_fp32)
        else:
            model = AlexNet(lrn_fp32=config.lrn_fp32).to(device)
        prepare_model(model, channels_last=config.channels_last, compile=config.compiled)
        opt = PaperSGD(model.parameters(), lr=bench_lr(batch))
        images = 50 * torch.randn(batch, 3, 224, 224, device=devices[0])
        labels = torch.randint(0, 1000, (batch,), device=model.output_device)
        dtype = torch.bfloat16 if config.precision == "bf16" else None

        def step():
            return train_step(model, opt, images, labels, autocast_dtype=dtype, channels_last=config.channels_last)

        for _ in range(warmup):  # includes compilation and cuDNN autotuning
            step()
        _sync(devices)  # only around the timed region: the steps themselves never sync
        start = time.perf_counter()
        for _ in range(iters):
            loss = step()
        _sync(devices)
        seconds = (time.perf_counter() - start) / iters
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()}")
        result.step_ms = 1e3 * seconds
        result.images_per_s = batch / seconds
        result.model_tflops = result.images_per_s * TRAIN_FLOP_PER_IMAGE / 1e12
    except Exception as exc:  # one failing configuration (e.g. compile) must not end the run
        result.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        model = opt = images = labels = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch._dynamo.reset()
    return result


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """Measured dense matmul rate (TFLOP/s) of an n x n x n product: the card's practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync([device])
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync([device])
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def plot(results: list[Result], title: str, path: Path) -> None:
    """Horizontal bars of images/s, one per configuration that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.images_per_s]
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.45 * len(done)))
    ax.barh([r.config.label for r in done], [r.images_per_s for r in done], color="tab:blue")
    for i, r in enumerate(done):
        ax.text(r.images_per_s, i, f" {r.images_per_s:.1f}", va="center")
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15 * max((r.images_per_s for r in done), default=1.0))  # room for the labels
    ax.set_xlabel("training images/s (forward + backward + update)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _grid(args: argparse.Namespace, on_gpu: bool) -> list[Config]:
    if args.grid == "short":
        return [c for c in SHORT_GRID if c.layout in args.layouts and (on_gpu or c.precision == "fp32")]
    both = {"off": [False], "on": [True], "both": [False, True]}
    precisions = args.precisions or (["fp32", "bf16"] if on_gpu else ["fp32"])
    channels_last = both[args.channels_last or ("both" if on_gpu else "off")]
    compiled = both[args.compile or ("both" if on_gpu else "off")]
    return [Config(*c) for c in itertools.product(args.layouts, precisions, channels_last, compiled)]


def _print_table(results: list[Result], peak_name: str) -> None:
    print(f"\n{'configuration':44} {'devices':22} {'img/s':>8} {'ms/step':>9} {'TFLOP/s':>8} {'share':>7}")
    for r in results:
        if r.error:
            print(f"{r.config.label:44} {','.join(r.devices):22} failed: {r.error}")
            continue
        share = f"{100 * r.share_of_matmul_peak:.1f}%" if r.share_of_matmul_peak is not None else "-"
        print(f"{r.config.label:44} {','.join(r.devices):22} {r.images_per_s:8.1f} {r.step_ms:9.1f} "
              f"{r.model_tflops:8.3f} {share:>7}")
    print(f"share = model FLOP rate ({TRAIN_FLOP_PER_IMAGE / 1e9} GFLOP/image) / {peak_name}")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", type=report_arg, default=Path("bench/model.json"))
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=at_least_one(), default=128)
    p.add_argument("--warmup", type=int, help="untimed steps (default: CPU 2, GPU 10)")
    p.add_argument("--iters", type=at_least_one(), help="timed steps (default: CPU 3, GPU 30)")
    p.add_argument("--layouts", nargs="+", default=["grouped", "towers"], choices=["grouped", "towers"])
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"])
    p.add_argument("--channels-last", choices=["off", "on", "both"])
    p.add_argument("--compile", choices=["off", "on", "both"])
    p.add_argument("--grid", choices=["full", "short"], default="full",
                   help="short: the bf16 channels_last fast path and one change at a time from it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark grid, print the table, write the JSON report and the chart."""
    args = _arguments(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms once
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2)
    iters = args.iters if args.iters is not None else (30 if on_gpu else 3)

    peak_dtype = torch.bfloat16 if on_gpu else torch.float32
    peak = matmul_tflops(device, peak_dtype, n=8192 if on_gpu else 2048, iters=50 if on_gpu else 5)
    peak_name = f"measured {'bf16' if on_gpu else 'fp32'} matmul rate {peak:.2f} TFLOP/s"
    print(f"{peak_name}; batch {args.batch}, lr {bench_lr(args.batch):g}", flush=True)
    report = header("model train_step throughput")
    results = []
    for config in _grid(args, on_gpu):
        print(f"timing {config.label} ...", flush=True)
        result = time_config(config, device, args.batch, warmup, iters)
        if result.model_tflops is not None:
            result.share_of_matmul_peak = result.model_tflops / peak
        results.append(result)
    _print_table(results, peak_name)

    report.update({
        "device": str(device),
        "batch": args.batch,
        "lr": bench_lr(args.batch),
        "warmup_steps": warmup,
        "timed_steps": iters,
        "train_flop_per_image": TRAIN_FLOP_PER_IMAGE,
        "matmul_peak": {"dtype": "bf16" if on_gpu else "fp32", "tflops": peak},
        "results": [{**dataclasses.asdict(r.config), **{k: v for k, v in dataclasses.asdict(r).items() if k != "config"}}
                    for r in results],
    })
    finish(report)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    title = f"AlexNet train step, batch {args.batch} (lr {bench_lr(args.batch):g}), {where(report, on_gpu)}"
    plot(results, title, args.report.with_suffix(".png"))
    print(f"wrote {args.report} and {args.report.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
