"""Data-parallel scaling of the training service on this machine: 1 rank against N ranks
(torchrun, gloo on the CPU / NCCL on GPUs) at the SAME global batch, so the same optimisation
work is split, not multiplied.

    .venv/bin/python -m bench.bench_scaling --shards data/shards --report bench/scaling.json

Each configuration is one real ``python -m service`` run (through torchrun for N > 1) of one
epoch with 1-view evaluation; the rate is read from rank 0's JSON log: training images of every
rank per second of its log windows, the first window (pipeline start, first allocations) left
out.  Prints a table, writes the JSON record and a PNG next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.charts import bars
from bench.inputs import report_arg, shards_or_exit
from bench.record import finish, header
from common.config_values import at_least_one
from shards.config import ShardConfig

ROOT = Path(__file__).resolve().parents[1]


def run_ranks(shards: Path, ranks: int, global_batch: int, threads: int, work: Path) -> dict:
    """One epoch on ``ranks`` ranks at ``global_batch``; the global images/s of its windows."""
    out = work / f"ranks{ranks}"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    cmd = [sys.executable, *launcher, "-m", "service", "--shards", str(shards), "--out", str(out), "--fresh", "true",
           "--epochs", "1", "--eval_views", "1", "--log_every", "2", "--model.bias_init", "0.1",
           "--loader.batch_size", str(global_batch // ranks), "--loader.threads", str(threads),
           "--http.port", "0", "--checkpoint.every_seconds", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    print(f"{ranks} rank(s): starting one epoch of the service, batch {global_batch // ranks} per rank", flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{ranks} rank(s) failed:\n{done.stderr[-2000:]}")
    print(f"{ranks} rank(s): done in {time.perf_counter() - started:.0f} s", flush=True)
    windows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    windows = [w for w in windows if w["event"] == "train"][1:]
    seconds = sum(w["window_seconds"] for w in windows)
    images = sum(w["images_per_s"] * w["window_seconds"] for w in windows) * ranks
    return {"ranks": ranks, "batch_per_rank": global_batch // ranks, "global_batch": global_batch,
            "threads_per_rank": threads, "images_per_s": images / seconds, "timed_seconds": seconds,
            "wall_seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, default=ShardConfig.out)
    p.add_argument("--report", type=report_arg, default=Path("bench/scaling.json"))
    p.add_argument("--ranks", type=at_least_one(), default=2, help="compared with 1 rank")
    p.add_argument("--global-batch", type=at_least_one(), default=32)
    args = p.parse_args(argv)
    shards_or_exit("bench_scaling", args.shards)
    record = header("data-parallel scaling, same global batch")
    cores = record["machine"]["cpu_cores"]
    with tempfile.TemporaryDirectory() as work:
        results = [run_ranks(args.shards, n, args.global_batch, max(1, cores // n), Path(work))
                   for n in (1, args.ranks)]
    speedup = results[1]["images_per_s"] / results[0]["images_per_s"]
    print(f"{'ranks':>5} {'batch/rank':>10} {'threads/rank':>12} {'images/s':>9}")
    for r in results:
        print(f"{r['ranks']:>5} {r['batch_per_rank']:>10} {r['threads_per_rank']:>12} {r['images_per_s']:>9.1f}")
    print(f"speed-up 1 -> {args.ranks} ranks at global batch {args.global_batch}: {speedup:.2f}x "
          f"({cores} cores, load {os.getloadavg()[0]:.1f})")
    finish(record).update({"results": results, "speedup": speedup})
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(record, indent=2) + "\n")
    bars(args.report.with_suffix(".png"), {f"{r['ranks']} rank(s) x batch {r['batch_per_rank']}": r["images_per_s"]
                                           for r in results},
         "training images/s, all ranks", f"service, global batch {args.global_batch}, {cores} cores")
    print(f"wrote {args.report} and {args.report.with_suffix('.png')}")
    return record


if __name__ == "__main__":
    main()
