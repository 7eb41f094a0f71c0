"""Settings of the training service (``python -m service``): a TOML file and/or ``--section.key value``
flags, read by ``common.config`` into these frozen dataclasses, then checked by
:func:`validate` before anything starts (a bad value is exit code 2 with the key named).

Two kinds of keys: the *recipe* (data, model shape, optimizer, augmentation), which a checkpoint
must match to be resumed, and *operational* keys (where to run, how to log, how often to
checkpoint, how many epochs in all), which may change between a stop and a restart;
``OPERATIONAL`` lists the latter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from common.config import COMMAND_LINE_ONLY
from common.cuda import CudaSync
from model.optim import decay_bound
from pipeline.config import LoaderConfig
from pipeline.views import VIEW_COUNTS
from service.model_settings import ModelSettings, device_name_ok, model_problems
from shards.config import ShardConfig

LrScaling = Literal["linear", "sqrt", "none"]


@dataclass(frozen=True)
class OptimSettings:
    """The paper's update rule and learning-rate schedule (docs/reference.md)."""

    lr: float = 0.01  # > 0 (0 would train nothing: every update a no-op)
    momentum: float = 0.9  # in [0, 1): the share of the velocity kept from one step to the next
    weight_decay: float = 5e-4
    # true: the paper, every weight decays, biases included; false: Caffe/cuda-convnet, biases exempt.
    bias_decay: bool = True
    patience: int = 3  # evaluations without a new best val error before lr /= 10
    max_drops: int = 3  # at most as many as leave lr a float32 normal number (most_drops)
    # Data parallel: ``lr`` is the rate for one rank's batch (loader.batch_size; the paper's 0.01
    # at 128), and N ranks make a global batch N times larger.  "linear" multiplies lr by N
    # (Goyal et al. 2017), "sqrt" by sqrt(N) (Krizhevsky 2014's argument from the gradient's
    # noise), "none" keeps it.  One process: factor 1 whatever the rule (the paper's recipe).
    lr_scaling: LrScaling = "linear"


LR_SCALING = get_args(LrScaling)


def lr_factor(optim: OptimSettings, ranks: int) -> float:
    """How much ``optim.lr`` is multiplied by when ``ranks`` ranks train together."""
    return {"linear": float(ranks), "sqrt": math.sqrt(ranks), "none": 1.0}[optim.lr_scaling]


@dataclass(frozen=True)
class CheckpointSettings:
    """When to write ``<out>/checkpoint-<step>.pt`` (always at each epoch end and on a stop)."""

    every_steps: int = 0  # 0 = not by step count
    every_seconds: float = 300.0  # wall time between checkpoints; 0 = not by time
    keep: int = 3  # the newest K checkpoints are kept
    background: bool = True  # write the file in a thread; the loop only waits for the copy to host


@dataclass(frozen=True)
class HttpSettings:
    """The metrics/health/status endpoint of this process (port + LOCAL_RANK under torchrun)."""

    host: str = "127.0.0.1"  # this machine only; 0.0.0.0 to be scraped from elsewhere
    port: int = 9431  # 9400 is dcgm-exporter's; 0 = any free port (printed at start)
    stall_seconds: float = 300.0  # /healthz turns 503 after this long without a heartbeat


@dataclass(frozen=True)
class DataSettings:
    """Whether the shards are still the ones ``make shards`` wrote (``service.shard_check``)."""

    # When each shard's sha256 is compared with the manifest's (remembered in <out>/shard-checks.json,
    # so a restart hashes only what changed): "background" starts training at once while a
    # low-priority thread hashes; "before" builds the loaders only once every shard is checked.
    verify: Literal["background", "before"] = "background"
    # A shard that differs: "stop" (exit 1 naming shard and sample); "skip" leaves it out of the
    # readers (DALI cannot drop a sample or a shard from a running reader), counts its samples in
    # alexnet_samples_failed_total, says so and trains on: it needs verify "before".
    on_corrupt: Literal["stop", "skip"] = "stop"


@dataclass(frozen=True)
class DebugSettings:
    """Switches for tests and investigations; off in normal runs."""

    ids: bool = False  # append each step's sample ids to <out>/ids.jsonl (exact-resume checks)


@dataclass(frozen=True)
class TrainConfig:
    """One training run."""

    shards: Path = ShardConfig.out  # where make shards writes by default
    out: Path = Path("runs/default")
    epochs: int = 90  # 1..10000 (MAX_EPOCHS)
    device: str = "auto"  # "auto" = cuda:<LOCAL_RANK> when present, else cpu
    cuda_sync: CudaSync = "auto"  # how the host waits for the GPU: spin, yield or block (common.cuda)
    seed: int = 0
    eval_views: int = 10  # 1 (centre crop) or 10 (the paper's views)
    log_every: int = 50  # steps between log lines (and GPU syncs)
    # true: delete this run directory's checkpoints and logs, start over.  Command line only: a
    # config file is read again at every start (docker/entrypoint.sh's restarts too), and would
    # wipe the run each time.
    fresh: bool = field(default=False, metadata={COMMAND_LINE_ONLY: "it deletes the run directory's checkpoints "
                                                 "and logs, and a file is read again at every start and restart"})
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelSettings = field(default_factory=ModelSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    data: DataSettings = field(default_factory=DataSettings)
    debug: DebugSettings = field(default_factory=DebugSettings)


# Keys (dotted) that may differ between a checkpoint and the run resuming it; a section name
# covers all its keys.  Everything else is the recipe and must match.
OPERATIONAL = frozenset({
    "shards",  # the data is compared by content (the manifest's checksums), not by path
    "out", "epochs", "device", "cuda_sync", "eval_views", "log_every", "fresh",
    "loader.threads", "loader.prefetch", "loader.hw_decoder_load", "loader.fast_idct", "loader.dtype",
    "loader.handover", "loader.affinity", "loader.memory_format",
    "model.layout", "model.devices", "model.autocast", "model.channels_last", "model.compile",
    "model.compile_mode", "model.trace_backward", "model.lrn", "model.cudnn_benchmark_limit", "model.input_channels",
    "checkpoint", "http", "data", "debug",
})

# The seed is 0 .. 2**32 - 1, what every seeded library takes; the service derives per-rank and
# per-device seeds by adding offsets (service.rng.torch_seed), which stay far below torch's 2**64 limit.
MAX_SEED = 2**32 - 1
# The optimizer keeps its hyperparameters as float32: a larger value does not convert.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_MIN_NORMAL = 1.1754943508222875e-38
# Epochs at most: over 100 times the paper's ~90, far past any schedule of this model (three lr
# drops, then nothing left to learn), and room for small-data runs of thousands.  Each epoch's end
# rewrites history.json and redraws curve.png over every epoch so far; 10**9 was trained on.
MAX_EPOCHS = 10_000


def most_drops(lr: float, factor: float = 0.1) -> int:
    """The lr drops (``lr *= factor``, model.schedule) that leave ``lr`` at least float32's smallest
    normal number: a smaller rate rounds to 0 in the update (the rule the lr itself is held to), and
    a run past that many plateaus trained on with every update a no-op."""
    drops = 0
    while math.isfinite(lr) and lr * factor >= FLOAT32_MIN_NORMAL:
        lr, drops = lr * factor, drops + 1
    return drops


def validate(cfg: TrainConfig) -> list[str]:
    """Every problem with ``cfg``, each naming its key; empty when the run may start."""
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}")
    need(cfg.epochs <= MAX_EPOCHS, f"epochs must be at most {MAX_EPOCHS} (over 100 times the paper's 90), "
         f"got {cfg.epochs}")
    need(cfg.eval_views in VIEW_COUNTS,
         f"eval_views must be {' or '.join(map(str, VIEW_COUNTS))}, got {cfg.eval_views}")
    need(cfg.log_every >= 1, f"log_every must be >= 1, got {cfg.log_every}")
    need(device_name_ok(cfg.device), f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    need(0 <= cfg.seed <= MAX_SEED, f"seed must be in 0..{MAX_SEED}, got {cfg.seed}")
    # service.build.resolve replaces loader.seed with seed (every rank's pipeline seed derives from it):
    # another value would be dropped without a word, and the run trained on seed's data order.
    need(cfg.loader.seed in (LoaderConfig.seed, cfg.seed),
         f"loader.seed {cfg.loader.seed} is not used by the service (the pipelines are seeded from seed, "
         f"{cfg.seed}): give --seed {cfg.loader.seed} instead, and leave loader.seed out")
    try:
        cfg.loader.validate()
    except ValueError as exc:
        problems.append(f"loader.{exc}")
    problems += model_problems(cfg.model, cfg.loader)
    problems += _optim_problems(cfg.optim)
    c = cfg.checkpoint
    need(c.every_steps >= 0, f"checkpoint.every_steps must be >= 0 (0 = off), got {c.every_steps}")
    need(math.isfinite(c.every_seconds) and c.every_seconds >= 0,
         f"checkpoint.every_seconds must be a finite number >= 0 (0 = off), got {c.every_seconds}")
    need(c.keep >= 1, f"checkpoint.keep must be >= 1, got {c.keep}")
    # bind's wildcard: an unset-but-empty $HTTP_HOST (docker/entrypoint.sh) would serve every interface
    need(cfg.http.host.strip() != "", "http.host is empty: give 127.0.0.1 (this machine only) or 0.0.0.0 "
         "(every interface)")
    need(0 <= cfg.http.port <= 65535, f"http.port must be in 0..65535 (0 = any free port), got {cfg.http.port}")
    need(math.isfinite(cfg.http.stall_seconds) and cfg.http.stall_seconds > 0,
         f"http.stall_seconds must be a finite number > 0, got {cfg.http.stall_seconds}")
    need(cfg.data.on_corrupt != "skip" or cfg.data.verify == "before",
         "data.on_corrupt skip needs data.verify before: a shard can only be left out of the readers before they "
         "are built, so every shard must be checked first (add --data.verify before)")
    return problems


def _optim_problems(o: OptimSettings) -> list[str]:
    # lr 0 would train nothing for the whole run (every update a no-op); momentum and weight decay 0
    # are plain SGD and no decay.  The velocity is multiplied by the momentum every step: at 1 it
    # never decays, above it grows without bound (the run trained on until the loss diverged).
    # lr: float32's smallest normal number at least, as a smaller one rounds to 0 in the update's
    # float32 arithmetic (1e-50 passed "> 0" and trained nothing).
    checks = [
        (0 <= o.momentum < 1, f"optim.momentum must be a number in [0, 1), got {o.momentum} (the paper's is 0.9)"),
        (FLOAT32_MIN_NORMAL <= o.lr <= FLOAT32_MAX,
         f"optim.lr must be a number > 0 (float32's {FLOAT32_MIN_NORMAL:.4g} to {FLOAT32_MAX:.4g}), got {o.lr}"),
        (0 <= o.weight_decay <= FLOAT32_MAX,
         f"optim.weight_decay must be a number >= 0 (at most float32's {FLOAT32_MAX:.4g}), got {o.weight_decay}"),
        (o.patience >= 1, f"optim.patience must be >= 1, got {o.patience}"),
        (o.max_drops >= 0, f"optim.max_drops must be >= 0, got {o.max_drops}"),
        (not FLOAT32_MIN_NORMAL <= o.lr <= FLOAT32_MAX or o.max_drops <= most_drops(o.lr),
         f"optim.max_drops must be at most {most_drops(o.lr)} at optim.lr {o.lr} (each drop divides it by 10; one "
         f"more and it is below float32's {FLOAT32_MIN_NORMAL:.4g}, an update of 0), got {o.max_drops}"),
        (o.lr_scaling in LR_SCALING, f"optim.lr_scaling must be one of {LR_SCALING}, got {o.lr_scaling!r}"),
    ]
    problems = [message for ok, message in checks if not ok]
    return problems or [p for p in [decay_problem(o)] if p]  # one rank's lr; run_service checks N ranks'


def decay_problem(o: OptimSettings, ranks: int = 1) -> str | None:
    """Why ``o`` diverges from its first steps on ``ranks`` ranks, whatever the data: the lr the
    update uses (``optim.lr`` scaled by the ``lr_scaling`` rule; the schedule only lowers it)
    times ``optim.weight_decay`` at or past ``model.optim.decay_bound``.  ``None`` if it does not.
    ``optim.weight_decay 400`` at the paper's lr 0.01 trained on until the loss was nan (exit 6)."""
    scale, limit = lr_factor(o, ranks), decay_bound(o.momentum)
    lr = o.lr * scale
    if lr * o.weight_decay < limit:
        return None
    scaled = f" x {scale:g} (the {o.lr_scaling} rule, {ranks} ranks)" if scale != 1 else ""
    return (f"optim.lr {o.lr:g}{scaled} x optim.weight_decay {o.weight_decay:g} = {lr * o.weight_decay:g} is at least "
            f"2 x (1 + optim.momentum {o.momentum:g}) = {limit:g}, where the weight decay alone makes every weight "
            f"grow without bound: give --optim.weight_decay below {limit / lr:g} (the paper's is 5e-4) or a lower "
            f"--optim.lr")
