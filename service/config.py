"""Settings of ``python -m service.train`` (TOML file and/or ``--section.key value`` flags)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import LoaderConfig


@dataclass(frozen=True)
class ModelSettings:
    """Which AlexNet layout, where, and how fast (see ``model.AlexNet``)."""

    layout: str = "grouped"  # "grouped" (one device) or "towers" (one tower per device)
    devices: tuple[str, ...] = ()  # towers: (device_a, device_b); empty = the run's device twice
    bias_init: float = 1.0  # the paper's non-zero bias; Caffe's 0.1 avoids a long flat start
    dropout: float = 0.5
    autocast: str = "none"  # "none" | "bfloat16" | "float16" (GPU)
    channels_last: bool = False
    compile: bool = False


@dataclass(frozen=True)
class OptimSettings:
    """The paper's rule and schedule (SPEC section 2)."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    patience: int = 3  # evaluations without a new best val error before lr /= 10
    max_drops: int = 3


@dataclass(frozen=True)
class TrainConfig:
    """One training run."""

    shards: Path = Path("data/shards")
    out: Path = Path("runs/default")
    epochs: int = 90
    device: str = "auto"  # "auto" = cuda:0 when present, else cpu
    seed: int = 0
    eval_views: int = 10  # 1 (centre crop) or 10 (the paper's views)
    log_every: int = 50  # steps between log lines (and GPU syncs)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelSettings = field(default_factory=ModelSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
