"""``make gpu-check``: every GPU path of the project measured by one prepared command.

GPU time is scarce and billed by the minute, so this is ready before a GPU is: it generates
its own data, runs each part in a child process with its own time limit (a crash, hang or CUDA
error in one part cannot take the others down), records each part as ok / failed (with the
error) / skipped (with the reason) in ``OUT/gpu_check.json`` (rewritten after every part, so a
run cut short still returns what it measured), prints a summary table, and exits 0 whenever the
JSON was written (128 + the signal when a signal stopped it: see the end).  Parts:

  versions      interpreter, torch/CUDA/cuDNN/DALI/nvImageCodec versions, what torch sees
  nvidia-smi    card, driver, memory, clocks
  data          the sample dataset scaled up (10,800 training images at ImageNet sizes, all
                cores but 4) and sharded with ``python -m shards``  } these two run side by side
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
                alone of the same configuration (issue 13's criterion 2).  Run without the
                sweep (``--parts service``) after one into the same OUT, it runs that sweep's
                recommendation on that run's shards: a GPU lent call by call does the two apart
  roi-probe     nvImageCodec's GPU ROI decode (NVIDIA/nvImageCodec#55) in a child: works or not

At the end it prints and records (``projection``) the wall time of 90 ImageNet epochs with the
10-view evaluation each epoch at the measured rates.  Stopped by SIGTERM or SIGINT (a runner's
``timeout``, Ctrl-C), it kills the parts still running, records them as stopped (the sweep with
the results it had written), writes the JSON with the projection, and exits with 128 + the signal.

Without a GPU (or with ``--dry``) the same parts run in a dry mode on the CPU, at a tiny size,
and the CUDA-only ones only start (collect, import) and report skipped: ``tests/test_gpu_check.py``
runs it, so the script cannot rot.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import gpu_parts
from bench.child import child_env, failure, kill, reap, spawn
from bench.gpu_check_parts import PARTS, SIDE_BY_SIDE, Context, Part, earlier_sweep, keep_files


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
    """Wait within the part's limit, counted from its start (a part beside another is waited for
    once that one ends), then record ok / failed with the error."""
    started = part.record["started"]
    limit = max(1.0, min(part.cap, ctx.deadline - started))
    code = reap(proc, limit - (time.time() - started))
    with _deferred():
        settle(part, ctx, log, failure(code, limit, log.read_text(errors="replace")) if code != 0 else None)


def settle(part: Part, ctx: Context, log: Path, error: str | None) -> None:
    """Record how the part ended: ok with its results, or failed with ``error`` (with the results
    it left all the same where the part can tell: ``Part.salvage``).  Its kept files are copied."""
    text = log.read_text(errors="replace")
    started = part.record.pop("started")
    part.record["seconds"] = round(time.time() - started, 1)
    if problem := keep_files(part, ctx, started):
        part.record["keep_error"] = problem
    if error is not None:
        part.record.update(status="failed", error=error)
        if part.salvage:
            try:
                part.record["results"] = part.read(ctx, text)
            except Exception:  # nothing usable was left: the error says why
                pass
        return
    try:
        part.record["results"] = part.read(ctx, text)
        part.record["status"] = "skipped" if ctx.dry and part.cuda_only else "ok"
        if part.record["status"] == "skipped":
            part.record["reason"] = "no CUDA device (dry mode: the part started and checked its inputs)"
    except Exception as exc:  # a part's output that cannot be read is that part's failure
        part.record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived while the parts ran.  A BaseException, as KeyboardInterrupt is:
    no ``except Exception`` around a part's reading may take it for that part's failure."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class _Gate:
    """Where a stop waits while a part starts or is recorded (``_deferred``)."""

    depth = 0  # _deferred blocks entered and not left
    pending: int | None = None  # the signal that arrived in one


def _stop(signum: int, frame: object) -> None:
    """The handler: one stop, then both signals are ignored, so the clean-up runs to its end."""
    if _Gate.depth:
        _Gate.pending = signum
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


@contextlib.contextmanager
def _deferred():
    """A stop that arrives in here is handled as the block ends: starting a part (a child running
    but not yet listed, so never killed) or recording one (half a record) is never cut in two.
    Held back by the handler, not by blocking the signals: a child inherits a blocked mask
    through exec and ignores SIGTERM all its life: ``multiprocessing.Pool``'s exit, which
    terminates its workers with SIGTERM, then hangs (the data part's ``sampledata`` timed out in
    CI; a Pool of 8 hangs so here too)."""
    _Gate.depth += 1
    try:
        yield
    finally:
        _Gate.depth -= 1
        if not _Gate.depth and _Gate.pending is not None:
            signum, _Gate.pending = _Gate.pending, None
            _stop(signum, None)


def skip_reason(part: Part, ctx: Context, records: dict[str, dict]) -> str | None:
    """Why ``part`` cannot run now, or None.  A needed part not selected counts as done when an
    earlier run left what it makes (``Part.made``: ``--parts service`` after a sweep)."""
    if ctx.only and part.name not in ctx.only:
        return "not selected (--parts)"
    by_name = {p.name: p for p in PARTS}
    for need in part.needs:
        made = by_name[need].made
        ready = need not in ctx.only and made is not None and made(ctx)
        if records.get(need, {}).get("status") != "ok" and not ready:
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
        running: list[tuple[Part, subprocess.Popen, Path]] = []
        try:
            for member in group:
                done.add(member.name)
                reason = skip_reason(member, ctx, records)
                if reason:
                    member.record.update(status="skipped", reason=reason)
                    continue
                print(f"gpu-check: {member.name} ...", flush=True)
                with _deferred():
                    running.append((member, *start(member, ctx)))
            for member, proc, log in running:
                finish(member, ctx, proc, log)
                print(f"gpu-check: {member.name}: {member.record['status']} ({member.record['seconds']} s)",
                      flush=True)
        except Stopped as stop:
            unsettled = [(member, proc, log) for member, proc, log in running if "started" in member.record]
            kill(*(proc for _, proc, _ in unsettled))  # still running: killed together, with all they started
            for member, _, log in unsettled:
                settle(member, ctx, log, f"stopped by {stop} after {time.time() - member.record['started']:.0f} s")
            raise
        write_json(ctx, header, records)
    return records


def run_until_stopped(ctx: Context, header: dict) -> tuple[dict, Stopped | None]:
    """``run_parts``, or what it had done when SIGTERM or SIGINT stopped it (the parts still
    running then killed and recorded as stopped, the rest as not started): the records, and the
    stop.  The signals are ignored afterwards: the JSON is written whatever arrives then."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)
    try:
        return run_parts(ctx, header), None
    except Stopped as stop:
        header["stopped"] = f"by {stop}: the parts still running were killed, the rest did not start"
        records = {p.name: p.record for p in PARTS}
        for record in records.values():
            if record.pop("started", None) is not None:  # stopped before it was recorded
                record.update(status="failed", error=f"stopped by {stop}")
            elif "status" not in record:  # never started (a part that ended keeps its record as it is)
                record.update(status="skipped", reason=f"the run was stopped by {stop}")
        print(f"gpu-check: stopped by {stop}", flush=True)
        return records, stop
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


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
    earlier = earlier_sweep(ctx)
    if earlier:
        ctx.service_flags = tuple(earlier["recommended"]["flags"])
        print(f"gpu-check: the service part runs the recommendation of the sweep in {ctx.out / 'sweep.json'} "
              f"(started {earlier['started']}): {earlier['recommended']['name']}", flush=True)
    records, stopped = run_until_stopped(ctx, header)
    if earlier:  # the projection's evaluation rate and the summary's sweep line come from it
        records["sweep"].update(results=earlier, reason=f"not selected (--parts); results of the sweep in "
                                f"{ctx.out / 'sweep.json'}, started {earlier['started']}")
    header["projection"] = gpu_parts.project(records)
    path = write_json(ctx, header, records)
    print_summary(records, path)
    if header["projection"]:
        print(f"projection: {gpu_parts.projection_line(header['projection'])}")
    return 128 + stopped.signum if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
