"""``make gpu-check``: every GPU path of the project measured by one prepared command.

GPU time is scarce and billed by the minute, so this is ready before a GPU is: it generates
its own data, runs each part in a child process with its own time limit (a crash, hang or CUDA
error in one part cannot take the others down), records each part as ok / failed (with the
error) / skipped (with the reason) in ``OUT/gpu_check.json`` (rewritten after every part, so a
run cut short still returns what it measured), prints a summary table, and exits 0 whenever the
JSON was written.  Parts:

  versions      interpreter, torch/CUDA/cuDNN/DALI/nvImageCodec versions, what torch sees
  nvidia-smi    card, driver, memory, clocks
  data          the sample dataset scaled up (10,800 training images at ImageNet sizes, all
                cores) and sharded with ``python -m shards``   } these two run side by side
  gpu-tests     ``pytest -m gpu`` (towers on cuda:0/cuda:1 or cuda:0 twice, no host sync in the
                training loop, GPU normaliser vs CPU, nvJPEG vs CPU decode)  }
  bench-model   ``bench.bench_model --grid short``: bf16/fp32, channels_last, compile, towers,
                LRN in fp32 vs bf16, with the share of the measured bf16 matmul rate
  bench-pipeline ``bench.bench_pipeline --configs gpu-check``: mixed decode (uint8 stage, with
                the GPU normaliser, DALI's own decode-only rate) and CPU decode on all cores
  sweep         ``bench.sweep``: issue 13's A/B grid (model alone, pipeline alone, end to end, a
                torch.profiler window), one child per configuration, and the recommendation
  service       the training service for 3 epochs at the paper's batch 128 with the sweep's
                recommended settings (without a sweep: bf16, channels_last, compiled model),
                10-view evaluation: images/s and data-wait share end to end, against the model
                alone of the same configuration (issue 13's criterion 2)
  roi-probe     nvImageCodec's GPU ROI decode (NVIDIA/nvImageCodec#55) in a child: works or not

At the end it prints and records (``projection``) the wall time of 90 ImageNet epochs with the
10-view evaluation each epoch at the measured rates.

Without a GPU (or with ``--dry``) the same parts run in a dry mode on the CPU, at a tiny size,
and the CUDA-only ones only start (collect, import) and report skipped: ``tests/test_gpu_check.py``
runs it, so the script cannot rot.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench import gpu_parts
from bench.child import ROOT, child_env, failure, reap, spawn


@dataclass
class Context:
    out: Path
    data: Path
    dry: bool
    deadline: float
    python: str = sys.executable
    only: tuple[str, ...] = ()  # --parts: run these, skip the others
    env: dict[str, str] = field(default_factory=dict)  # for every part's process
    service_flags: tuple[str, ...] = ()  # the sweep's recommendation, once the sweep part has run

    def module(self, name: str, *args: object) -> list[str]:
        return [self.python, "-m", name, *map(str, args)]


@dataclass
class Part:
    """One measured part: its commands (run in order, one time limit), how to read its output."""

    name: str
    cap: float  # seconds at most
    commands: Callable[[Context], list[list[str]]]
    read: Callable[[Context, str], dict] = lambda ctx, log: {}
    cuda_only: bool = False  # dry mode: the commands only start it; the part reports skipped
    needs: tuple[str, ...] = ()  # parts that must have succeeded first
    record: dict = field(default_factory=dict)


def result_line(ctx: Context, log: str) -> dict:
    """The ``RESULT {...}`` line a ``bench.gpu_parts`` child prints."""
    lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError("the part printed no RESULT line")
    return json.loads(lines[-1][len("RESULT "):])


def data_commands(ctx: Context) -> list[list[str]]:
    per_class, val = (8, 2) if ctx.dry else (900, 50)
    sample, shards = ctx.data / "sample", ctx.data / "shards"
    return [ctx.module("sampledata", "--out", sample, "--train_per_class", per_class, "--val_per_class", val,
                       *(["--classes", 2] if ctx.dry else []), "--workers", 0),
            ctx.module("shards", "--src", sample, "--out", shards, "--shard_samples", 8 if ctx.dry else 1000,
                       "--workers", 0)]


def gpu_test_commands(ctx: Context) -> list[list[str]]:
    base = ctx.module("pytest", "-m", "gpu", "-p", "no:cacheprovider", "-rA", str(ROOT / "tests"))
    return [base + ["--collect-only", "-q"]] if ctx.dry else [base + ["-q", "--junitxml", ctx.out / "gpu_tests.xml"]]


def gpu_test_read(ctx: Context, log: str) -> dict:
    if ctx.dry:
        return {"collected": log.strip().splitlines()[-1]}
    summary = gpu_parts.junit_summary(ctx.out / "gpu_tests.xml")
    if summary["failed"]:
        raise RuntimeError(f"{len(summary['failed'])} gpu test(s) failed: {json.dumps(summary['failed'])[:1500]}")
    return summary


def model_commands(ctx: Context) -> list[list[str]]:
    extra = ["--batch", 2, "--warmup", 0, "--iters", 1, "--layouts", "grouped"] if ctx.dry else []
    return [ctx.module("bench.bench_model", "--grid", "short", "--report", ctx.out / "model.json", *extra)]


def pipeline_commands(ctx: Context) -> list[list[str]]:
    size = ["--images", 32, "--repeat", 1, "--warmup", 1, "--batch", 8] if ctx.dry else ["--images", 6144, "--repeat", 3]
    return [ctx.module("bench.bench_pipeline", "--shards", ctx.data / "shards", "--report", ctx.out / "pipeline.json",
                       "--configs", "gpu-check", *size)]


# The service part's settings without a sweep recommendation: the fast path measured in run 2.
SERVICE_DEFAULT = ("--loader.batch_size", "128", "--model.autocast", "bfloat16", "--model.channels_last", "true",
                   "--model.compile", "model")
SERVICE_DRY = ("--loader.batch_size", "8", "--model.autocast", "none")


def service_flags(ctx: Context) -> tuple[str, ...]:
    """The sweep's recommended configuration when the sweep part ran, else the default fast path."""
    return ctx.service_flags or (SERVICE_DRY if ctx.dry else SERVICE_DEFAULT)


def service_commands(ctx: Context) -> list[list[str]]:
    run = ctx.data / "service-run"
    return [ctx.module("service", "--shards", ctx.data / "shards", "--out", run, "--eval_views", 10, "--fresh", "true",
                       "--log_every", 20, "--model.bias_init", 0.1, "--http.port", 0, "--http.host", "127.0.0.1",
                       "--checkpoint.every_seconds", 0, "--epochs", 1 if ctx.dry else 3, *service_flags(ctx))]


def service_read(ctx: Context, log: str) -> dict:
    """images/s and data-wait share per epoch, and the last epoch against the model alone of the
    same configuration (issue 13's criterion 2): the sweep's measurement of exactly these flags,
    or bench-model's compiled bf16 channels_last configuration for the default flags."""
    alone, source = None, None
    if ctx.service_flags:
        alone, source = gpu_parts.sweep_summary(ctx.out / "sweep.json")["recommended"].get(
            "model_alone_images_per_s"), "sweep: the recommended configuration's step on one of its batches"
    elif (ctx.out / "model.json").is_file():
        configs = gpu_parts.model_summary(ctx.out / "model.json")["configs"]
        alone = (configs.get("grouped bf16 channels_last compiled") or {}).get("images_per_s")
        source = "bench-model: grouped bf16 channels_last compiled"
    return {"flags": list(service_flags(ctx)), **gpu_parts.service_summary(ctx.data / "service-run", alone, source)}


def sweep_commands(ctx: Context) -> list[list[str]]:
    # What is left of the budget, less what the service part needs after it (when it runs).
    reserve = SERVICE_RESERVE if not ctx.only or "service" in ctx.only else 20
    budget = max(30.0, min(SWEEP_CAP, ctx.deadline - time.time() - reserve))
    return [ctx.module("bench.sweep", "--shards", ctx.data / "shards", "--out", ctx.out, "--seconds", round(budget),
                       *(["--dry"] if ctx.dry else []))]


def sweep_read(ctx: Context, log: str) -> dict:
    summary = gpu_parts.sweep_summary(ctx.out / "sweep.json")
    if summary.get("recommended"):
        ctx.service_flags = tuple(summary["recommended"]["flags"])
    return summary


SWEEP_CAP = 420  # issue 13: the grid in under 7 minutes
SERVICE_RESERVE = 150  # seconds kept for the service part (3 short epochs, compiled from the shared cache)


PARTS = [
    Part("versions", 60, lambda c: [c.module("bench.gpu_parts", "versions")], result_line),
    Part("nvidia-smi", 30, lambda c: [c.module("bench.gpu_parts", "nvidia-smi")], result_line, cuda_only=True),
    Part("data", 300, data_commands, lambda c, log: gpu_parts.data_summary(c.data / "shards")),
    Part("gpu-tests", 300, gpu_test_commands, gpu_test_read, cuda_only=True),
    Part("bench-model", 240, model_commands, lambda c, log: gpu_parts.model_summary(c.out / "model.json")),
    Part("bench-pipeline", 200, pipeline_commands,
         lambda c, log: gpu_parts.pipeline_summary(c.out / "pipeline.json"), needs=("data",)),
    Part("sweep", SWEEP_CAP, sweep_commands, sweep_read, needs=("data",)),
    Part("service", 240, service_commands, service_read, needs=("data",)),
    Part("roi-probe", 60, lambda c: [c.module("bench.gpu_parts", "roi-probe", c.data / "shards")], result_line,
         cuda_only=True, needs=("data",)),
]
SIDE_BY_SIDE = {"data": "gpu-tests"}  # CPU-bound data generation next to the tests (own small data)


def start(part: Part, ctx: Context) -> tuple[subprocess.Popen, Path] | None:
    """Launch the part's commands as one chain (bash ``&&``) in a new process group."""
    log = ctx.out / "logs" / f"{part.name}.log"
    chain = " && ".join(" ".join(_quote(a) for a in cmd) for cmd in part.commands(ctx))
    proc = spawn(["bash", "-c", chain], log, child_env(ctx.env))
    part.record.update(status="running", started=time.time())
    return proc, log


def _quote(arg: object) -> str:
    return shlex.quote(str(arg))


def finish(part: Part, ctx: Context, proc: subprocess.Popen, log: Path) -> None:
    """Wait within the part's limit, then record ok / failed with the error."""
    limit = max(1.0, min(part.cap, ctx.deadline - time.time()))
    code = reap(proc, limit - (time.time() - part.record["started"]))
    text = log.read_text(errors="replace")
    part.record["seconds"] = round(time.time() - part.record.pop("started"), 1)
    if code != 0:
        part.record.update(status="failed", error=failure(code, limit, text))
    else:
        try:
            part.record["results"] = part.read(ctx, text)
            part.record["status"] = "skipped" if ctx.dry and part.cuda_only else "ok"
            if part.record["status"] == "skipped":
                part.record["reason"] = "no CUDA device (dry mode: the part started and checked its inputs)"
        except Exception as exc:  # a part's output that cannot be read is that part's failure
            part.record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])


def skip_reason(part: Part, ctx: Context, records: dict[str, dict]) -> str | None:
    """Why ``part`` cannot run now, or None."""
    if ctx.only and part.name not in ctx.only:
        return "not selected (--parts)"
    for need in part.needs:
        if records.get(need, {}).get("status") != "ok":
            return f"needs the {need} part, which did not succeed"
    if ctx.deadline - time.time() < 15:
        return "the time budget (--seconds) is spent"
    if ctx.dry and part.cuda_only and part.name == "nvidia-smi":
        return "no CUDA device (dry mode)"
    return None


def run_parts(ctx: Context, header: dict) -> dict:
    """Every part in order (``SIDE_BY_SIDE`` pairs together); the JSON is rewritten after each."""
    records = {p.name: p.record for p in PARTS}
    by_name = {p.name: p for p in PARTS}
    done: set[str] = set()
    for part in PARTS:
        if part.name in done:
            continue
        group = [part] + ([by_name[SIDE_BY_SIDE[part.name]]] if part.name in SIDE_BY_SIDE else [])
        running = []
        for member in group:
            done.add(member.name)
            reason = skip_reason(member, ctx, records)
            if reason:
                member.record.update(status="skipped", reason=reason)
                continue
            print(f"gpu-check: {member.name} ...", flush=True)
            running.append((member, *start(member, ctx)))
        for member, proc, log in running:
            finish(member, ctx, proc, log)
            print(f"gpu-check: {member.name}: {member.record['status']} ({member.record['seconds']} s)", flush=True)
        write_json(ctx, header, records)
    return records


def write_json(ctx: Context, header: dict, records: dict[str, dict]) -> Path:
    path = ctx.out / "gpu_check.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**header, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parts": records},
                              indent=1) + "\n")
    os.replace(tmp, path)
    return path


def print_summary(records: dict[str, dict], path: Path) -> None:
    print(f"\n{'part':<15} {'status':<8} {'seconds':>8}  result")
    for name, record in records.items():
        line = gpu_parts.headline(name, record)
        print(f"{name:<15} {record.get('status', '-'):<8} {record.get('seconds', 0):>8}  {line}")
    print(f"\nwrote {path} (every part's log: {path.parent / 'logs'})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("data/gpu-check"), help="results: JSON, reports, logs")
    p.add_argument("--data", type=Path, default=Path("data/gpu-check-data"), help="generated images, shards, run")
    p.add_argument("--seconds", type=float, default=420, help="time budget for all parts")
    p.add_argument("--dry", action="store_true", help="the CPU dry mode even when a GPU is present")
    p.add_argument("--parts", default="", help=f"comma-separated subset of: {', '.join(x.name for x in PARTS)}")
    args = p.parse_args(argv)
    only = tuple(filter(None, args.parts.split(",")))
    unknown = set(only) - {x.name for x in PARTS}
    if unknown:
        p.error(f"--parts: unknown part(s) {', '.join(sorted(unknown))}")
    import torch

    dry = args.dry or not torch.cuda.is_available()
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    args.data.mkdir(parents=True, exist_ok=True)
    # Dry and GPU data apart: a dataset of another size in the same folder would mix with this one.
    data = (args.data / ("dry" if dry else "gpu")).resolve()
    # One inductor cache for every part: a graph compiled once (bench-model, sweep) loads in seconds later.
    ctx = Context(args.out.resolve(), data, dry, time.time() + args.seconds, only=only,
                  env={"TORCHINDUCTOR_CACHE_DIR": str(data / "inductor-cache")})
    header = {"mode": "dry" if dry else "gpu", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "seconds_budget": args.seconds, "python": sys.executable}
    print(f"gpu-check: {'DRY mode (no CUDA device): every part starts at a tiny size' if dry else 'GPU mode'}, "
          f"budget {args.seconds:.0f} s, results in {args.out}", flush=True)
    records = run_parts(ctx, header)
    header["projection"] = gpu_parts.project(records)
    path = write_json(ctx, header, records)
    print_summary(records, path)
    if header["projection"]:
        print(f"projection: {gpu_parts.projection_line(header['projection'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
