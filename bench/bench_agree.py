"""What the training loop's per-step agreement ("stop? checkpoint due?") costs every rank, with 2
and 4 ranks on this machine (torchrun, gloo), and what answering it one step late saves.

Each rank runs a stand-in for a GPU training step, the way the host thread sees one: it waits
``--step-ms`` (the device computing), joins an all-reduce of a gradient-sized-for-this-machine
tensor (DDP's, which keeps the ranks in lockstep), does 0-1 ms of host work (random per rank and
step: the skew the agreement then waits for), then asks the agreement in one of three ways:

- ``none``: no agreement (the floor);
- ``blocking``: ``Ranks.any`` (a gloo all-reduce of two int32, waited for at once), what the
  loop did before;
- ``lagged``: ``Agreement.lagged`` (the same all-reduce started now, its answer read after the
  next step), what the loop does now.

The modes run interleaved round by round (load from other jobs hits them alike); the cost of a
mode is its median ms/step minus ``none``'s.

    .venv/bin/python -m bench.bench_agree --report bench/agree.json

prints a table and writes the JSON record and a PNG next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.inputs import report_arg
from common.config_values import at_least_one

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "blocking", "lagged")


def worker(args: argparse.Namespace) -> None:
    """One rank (under torchrun): every mode, ``rounds`` times, ``steps`` steps each."""
    import torch
    import torch.distributed as dist

    from service.dist import Agreement, Ranks

    ranks = Ranks.from_env()
    ranks.start(torch.device("cpu"))
    grad = torch.zeros(args.grad_floats)
    rng = random.Random(ranks.rank)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            agreement = Agreement(ranks)
            ranks.barrier()
            start = time.perf_counter()
            for step in range(args.steps):
                time.sleep(args.step_ms / 1e3)
                dist.all_reduce(grad)
                time.sleep(rng.uniform(0, 1e-3))
                if mode == "blocking":
                    ranks.any(False, False)
                elif mode == "lagged":
                    agreement.lagged(step, False, False)
            agreement.settle(2)
            times[mode].append(1e3 * (time.perf_counter() - start) / args.steps)
    gathered = ranks.gather(times)
    if ranks.is_main:
        Path(args.worker_out).write_text(json.dumps(gathered))
    ranks.close()


def run(ranks: int, args: argparse.Namespace, tmp: Path) -> dict:
    """One torchrun of ``ranks`` workers; rank 0's ms/step per mode (every rank's is recorded)."""
    out = tmp / f"ranks{ranks}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "bench.bench_agree", "--worker-out", str(out), "--steps", str(args.steps),
           "--rounds", str(args.rounds), "--step-ms", str(args.step_ms), "--grad-floats", str(args.grad_floats)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    print(f"{ranks} ranks: starting ({args.rounds} rounds of {args.steps} steps in each of {len(MODES)} modes)",
          flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{ranks} ranks failed:\n{done.stderr[-3000:]}")
    print(f"{ranks} ranks: done in {time.perf_counter() - started:.0f} s", flush=True)
    per_rank = json.loads(out.read_text())
    median = {m: statistics.median(per_rank[0][m]) for m in MODES}
    return {"ranks": ranks, "median_ms_per_step": median,
            "cost_ms_per_step": {m: median[m] - median["none"] for m in MODES[1:]},
            "runs_ms_per_step": per_rank}


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", type=report_arg, default=Path("bench/agree.json"))
    p.add_argument("--ranks", type=at_least_one(), nargs="+", default=[2, 4])
    p.add_argument("--steps", type=at_least_one(), default=200)
    p.add_argument("--rounds", type=at_least_one(), default=5)
    p.add_argument("--step-ms", type=float, default=10.0, help="the device's share of a step")
    p.add_argument("--grad-floats", type=at_least_one(), default=1 << 16, help="floats all-reduced per step (DDP stand-in)")
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_out:
        return worker(args)
    import tempfile

    from bench.charts import bars
    from bench.record import finish, header

    record = header("agree")
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(n, args, Path(tmp)) for n in args.ranks]
    finish(record).update({"settings": {k: v for k, v in vars(args).items() if k not in ("report", "worker_out")},
                           "results": results})
    print(f"{'ranks':>5} | " + " | ".join(f"{m + ' ms/step':>18}" for m in MODES) + " | blocking cost | lagged cost")
    for r in results:
        med, cost = r["median_ms_per_step"], r["cost_ms_per_step"]
        print(f"{r['ranks']:>5} | " + " | ".join(f"{med[m]:>18.3f}" for m in MODES)
              + f" | {cost['blocking']:>13.3f} | {cost['lagged']:>11.3f}")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(record, indent=1) + "\n")
    values = {f"{r['ranks']} ranks, {m}": 1e3 * r["cost_ms_per_step"][m] for r in results for m in MODES[1:]}
    bars(args.report.with_suffix(".png"), values, "µs per step added by the agreement (median of rounds)",
         f"The per-step stop/checkpoint agreement, gloo, {args.step_ms:g} ms steps")
    print(f"wrote {args.report} and {args.report.with_suffix('.png')}")
    return record


if __name__ == "__main__":
    main()
