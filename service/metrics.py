"""The service's Prometheus metrics, in a private registry (SPEC 7 conventions).

The names are a contract with the Grafana dashboard and the Prometheus configuration: do not
rename them.  One prefix (``alexnet_``), base units, counters end in ``_total``, errors are
fractions 0..1, timestamps rather than ages.  The rank is not a label: Prometheus attaches it
as a target label (each rank serves its own port).

A private ``CollectorRegistry`` (not the global one) is handed to the HTTP layer, so tests and
benchmarks can build several services in one process, and nothing a library registers
globally leaks into the exposition.  The per-step calls (``step``) only touch counters and
histograms: a few microseconds, no device synchronisation.
"""
from __future__ import annotations

import importlib.metadata
import math
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

from service.status import StatusBoard

PREFIX = "alexnet_"
ROOT = Path(__file__).resolve().parents[1]

# Seconds per step or per data wait: from ~1 ms (the H100 target, 25,000 images/s, is 5.1 ms a batch
# of 128; an H200 measured 8.2 ms compiled: docs/benchmarks.md "GPU numbers") to a minute (a loaded
# 2-core CPU: ~1.2 s at batch 32, "Service"), roughly x1.5 apart so quantiles stay usable at both ends.
STEP_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0)
CHECKPOINT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def build_labels(device: str, layout: str, world_size: int) -> dict[str, str]:
    """Labels of ``alexnet_build_info``: versions, git revision, device, layout, world size."""
    try:
        import nvidia.dali

        dali = nvidia.dali.__version__
    except ImportError:
        dali = "none"
    return {"version": project_version(), "git_revision": git_revision(), "torch": torch.__version__, "dali": dali,
            "device": device, "layout": layout, "world_size": str(world_size)}


def project_version() -> str:
    """pyproject.toml's version in a checkout; the installed package's where there is none (the
    Docker image installs the project into its venv and keeps no pyproject.toml)."""
    try:
        return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        pass
    try:
        return importlib.metadata.version("alexnet2012")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def git_revision() -> str:
    """``ALEXNET_GIT_REVISION`` when set (the Docker image has no .git: its build passes the
    revision in), else the checkout's short commit, else "unknown"."""
    env = os.environ.get("ALEXNET_GIT_REVISION", "").strip()
    if env and env != "unknown":
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def previous_exit() -> float:
    """``ALEXNET_PREVIOUS_EXIT``: the code docker/entrypoint.sh saw the crash it restarts after end
    with (its own ``$?`` of the last launch), 0 when unset (a first start, or no entrypoint), NaN
    when it is not a whole number."""
    value = os.environ.get("ALEXNET_PREVIOUS_EXIT", "").strip() or "0"
    return float(value) if value.isdigit() else math.nan


class ServiceMetrics:
    """Every metric of one service process, registered in ``self.registry``."""

    def __init__(self, build: dict[str, str]) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open fds
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        p = PREFIX
        info = Gauge(p + "build_info", "Build and run metadata (always 1)", list(build), registry=r)
        info.labels(**build).set(1)
        self.images = Counter(p + "train_images", "Training images consumed", registry=r)
        self.steps = Counter(p + "train_steps", "Training steps (optimizer updates)", registry=r)
        self.step_seconds = Histogram(p + "train_step_seconds", "Host wall time per training step, data wait "
                                      "included (between consecutive batches)", buckets=STEP_BUCKETS, registry=r)
        self.data_wait = Histogram(p + "train_data_wait_seconds", "Time blocked waiting for the next batch",
                                   buckets=STEP_BUCKETS, registry=r)
        self.loss = Gauge(p + "train_loss", "Training loss at the last log interval", registry=r)
        self.lr = Gauge(p + "learning_rate", "Current learning rate", registry=r)
        self.epoch = Gauge(p + "epoch", "Epoch being trained (1-based)", registry=r)
        # What the loss is judged against (AlexNetNotLearning, the loss panel's chance line): a model
        # that learned nothing from the images at best predicts the class frequencies.
        self.chance_loss = Gauge(p + "chance_loss", "Training loss of a guess that ignores the image: the entropy "
                                 "of the training labels' class frequencies (ln(classes) when balanced)", registry=r)
        self.top1 = Gauge(p + "val_top1_error", "Validation top-1 error of the last evaluation (0..1)", registry=r)
        self.top5 = Gauge(p + "val_top5_error", "Validation top-5 error of the last evaluation (0..1)", registry=r)
        self.val_loss = Gauge(p + "val_loss", "Validation cross-entropy of the last evaluation", registry=r)
        self.eval_seconds = Gauge(p + "eval_duration_seconds", "Wall time of the last evaluation (all its views)",
                                  registry=r)
        self.last_checkpoint = Gauge(p + "last_checkpoint_timestamp_seconds",
                                     "Unix time the last checkpoint became durable", registry=r)
        self.checkpoint_bytes = Gauge(p + "checkpoint_size_bytes", "Size of the newest checkpoint file (the space "
                                      "the next one needs)", registry=r)
        self.disk_free = Gauge(p + "run_dir_free_bytes", "Bytes free to the trainer on the run directory's "
                               "filesystem", registry=r)
        self.checkpoint_seconds = Histogram(p + "checkpoint_duration_seconds", "Time the training loop was "
                                            "blocked by one checkpoint", buckets=CHECKPOINT_BUCKETS, registry=r)
        # Each sample once across the ranks (the dashboard sums them): a rank counts its own loader's
        # failure, rank 0 the shards the whole job leaves out (service.shard_check).
        self.samples_failed = Counter(p + "samples_failed", "Samples that could not be read or decoded by this "
                                      "rank's loader (the run stops), or, on rank 0 for the whole job, left out "
                                      "with a corrupt shard (data.on_corrupt skip)", registry=r)
        self.gpu_allocated = Gauge(p + "gpu_memory_allocated_bytes", "CUDA memory held by tensors", ["device"],
                                   registry=r)
        self.gpu_reserved = Gauge(p + "gpu_memory_reserved_bytes", "CUDA memory reserved by the caching "
                                  "allocator", ["device"], registry=r)
        self.heartbeat = Gauge(p + "heartbeat_timestamp_seconds", "Unix time of the training loop's last "
                               "sign of life (the heartbeat /healthz judges)", registry=r)
        # Known when the process fails with a diagnosed code; 0 (none) until then, never NaN: a healthy run shows 0.
        self.exit_code = Gauge(p + "exit_code", "The code this process exits with, once diagnosed (service/errors.py: "
                               "1 data, 2 settings or checkpoints, 4 a write failed, 6 diverged); 0 while none is",
                               registry=r)
        # How the last start ended, where only the restarting entrypoint knows it: the process cannot
        # learn its predecessor's exit code (an OOM kill or a segfault says nothing; service.unclean_end).
        self.previous_exit = Gauge(p + "previous_exit_code", "The exit code of the crash docker/entrypoint.sh "
                                   "restarted this trainer after (128+N: killed by signal N, 137 SIGKILL as the OOM "
                                   "killer sends it, 139 a segfault; 1 a Python traceback); 0 when this start is no "
                                   "such restart", registry=r)
        self.previous_exit.set(previous_exit())
        # Not known yet: NaN (no value in PromQL), not 0, which would read as "0% error", "the last
        # checkpoint was in 1970" or "lr 0"; lr, epoch and chance are known once the run has started (app.start).
        for gauge in (self.loss, self.chance_loss, self.lr, self.epoch, self.top1, self.top5, self.val_loss,
                      self.eval_seconds, self.last_checkpoint, self.checkpoint_bytes, self.disk_free, self.heartbeat):
            gauge.set(float("nan"))

    def follow(self, board: StatusBoard) -> None:
        """The heartbeat gauge reads ``board``'s last beat at each scrape: one heartbeat, the one
        ``/healthz`` judges, moved by every beat (start, steps, evaluation batches, checkpoints) and
        costing the beats nothing."""
        self.heartbeat.set_function(lambda: board.last_beat)

    def watch_disk(self, out: Path) -> None:
        """The free space of ``out``'s filesystem, read at each scrape (one statvfs): a run
        directory filling up is seen before the checkpoint that does not fit stops the run."""
        def free() -> float:
            try:
                return float(shutil.disk_usage(out).free)
            except OSError:  # gone or unreachable (a lost network mount): unknown, not a scrape error
                return math.nan

        self.disk_free.set_function(free)

    def checkpointed(self, when: float, path: Path) -> None:
        """The newest durable checkpoint (written, or resumed from): its unix time and its size."""
        self.last_checkpoint.set(when)
        self.checkpoint_bytes.set(path.stat().st_size)

    def step(self, images: int, step_seconds: float, data_seconds: float) -> None:
        """One training step (host-side numbers only)."""
        self.images.inc(images)
        self.steps.inc()
        self.step_seconds.observe(step_seconds)
        self.data_wait.observe(data_seconds)

    def gpu_memory(self, devices: list[torch.device]) -> None:
        """Allocated/reserved bytes of each CUDA device the model uses (nothing on the CPU)."""
        for d in devices:
            if d.type == "cuda":
                self.gpu_allocated.labels(device=str(d)).set(torch.cuda.memory_allocated(d))
                self.gpu_reserved.labels(device=str(d)).set(torch.cuda.memory_reserved(d))

    def chance(self, class_counts: tuple[int, ...]) -> None:
        """``alexnet_chance_loss`` from the training split's samples per class (the manifest's)."""
        total = sum(class_counts)
        self.chance_loss.set(-sum(n / total * math.log(n / total) for n in class_counts if n) if total else math.nan)

    def evaluation(self, top1: float, top5: float, loss: float, seconds: float = math.nan) -> None:
        self.top1.set(top1)
        self.top5.set(top5)
        self.val_loss.set(loss)
        self.eval_seconds.set(seconds)
