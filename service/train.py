"""``python -m service.train [--config FILE] [--key value ...]``: train AlexNet on the shards.

One process, one device (or two for the ``towers`` layout).  Each epoch: train over the
training loader, logging loss, images/s and the data-wait share every ``log_every`` steps;
then evaluate top-1/top-5 error (10-view by default) and let the plateau schedule decide
about the lr.  The history goes to ``out/history.json`` and a curve to ``out/curve.png``.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

import torch

from common.config import ConfigError, load_config, split_config_arg, to_dict
from model import AlexNet, PaperSGD, PlateauSchedule, evaluate, prepare_model, train_step
from pipeline import build_eval_loader, build_train_loader
from service.config import TrainConfig
from service.metric_logger import StepTimer
from service.plot import plot_history
from shards import manifest as contract

AUTOCAST = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did, for the history file and the plot."""

    epoch: int
    lr: float
    train_loss: float
    top1_error: float
    top5_error: float
    val_loss: float
    images_per_s: float
    data_share: float


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda:0 when a GPU is present, else cpu."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: TrainConfig, num_classes: int, device: torch.device) -> torch.nn.Module:
    """The AlexNet of ``cfg.model`` on ``device`` (or on ``cfg.model.devices`` for towers)."""
    m = cfg.model
    if m.layout == "towers":
        model = AlexNet(num_classes, "towers", m.devices or (device, device), bias_init=m.bias_init, dropout=m.dropout)
    else:
        model = AlexNet(num_classes, "grouped", bias_init=m.bias_init, dropout=m.dropout).to(device)
    return prepare_model(model, channels_last=m.channels_last, compile=m.compile)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(cfg: TrainConfig, model: torch.nn.Module, optimizer: PaperSGD, loader, device: torch.device,
                epoch: int) -> tuple[float, float, float]:
    """One pass over ``loader``; returns (mean loss, images/s, data-wait share)."""
    timer = StepTimer()
    loss_sum = torch.zeros((), device=device)
    steps = images = 0
    seconds = data = 0.0
    for step, (x, y) in enumerate(timer.iterate(loader, lambda b: b[1].shape[0]), 1):
        loss = train_step(model, optimizer, x, y, autocast_dtype=AUTOCAST[cfg.model.autocast],
                          channels_last=cfg.model.channels_last)
        loss_sum += loss.to(device)
        steps += 1
        if step % cfg.log_every == 0 or step == len(loader):
            w = timer.window(lambda: _sync(device))  # the only sync: once per log interval
            images, seconds, data = images + w.images, seconds + w.seconds, data + w.data_seconds
            print(f"epoch {epoch} step {step}/{len(loader)} loss {loss.item():.4f} "
                  f"{w.images_per_s:.1f} img/s data-wait {w.data_share:.0%}", flush=True)
    return loss_sum.item() / max(steps, 1), images / max(seconds, 1e-9), data / max(seconds, 1e-9)


def run(cfg: TrainConfig) -> list[EpochRecord]:
    """Train for ``cfg.epochs``; returns the per-epoch history."""
    manifest = contract.load(cfg.shards)  # fails early, with a hint, on a bad shard directory
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    loader_cfg = cfg.loader.replace(seed=cfg.seed)
    train = build_train_loader(cfg.shards, 0, 1, device, loader_cfg)
    val = build_eval_loader(cfg.shards, 0, 1, device, loader_cfg, views=cfg.eval_views)
    model = build_model(cfg, manifest.num_classes, device)
    o = cfg.optim
    optimizer = PaperSGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    schedule = PlateauSchedule(optimizer, patience=o.patience, max_drops=o.max_drops)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1) + "\n")
    print(f"train: {manifest.splits['train'].samples} images, {manifest.num_classes} classes "
          f"(chance top-1 error {1 - 1 / manifest.num_classes:.1%}), device {device}, layout {cfg.model.layout}")
    history: list[EpochRecord] = []
    for epoch in range(1, cfg.epochs + 1):
        lr = schedule.lrs[0]
        loss, rate, data_share = train_epoch(cfg, model, optimizer, train, device, epoch)
        result = evaluate(model, val, autocast_dtype=AUTOCAST[cfg.model.autocast],
                          channels_last=cfg.model.channels_last)
        dropped = schedule.step(result.top1_error)
        history.append(EpochRecord(epoch, lr, loss, result.top1_error, result.top5_error, result.loss, rate, data_share))
        print(f"epoch {epoch}: train loss {loss:.4f}, val top-1 error {result.top1_error:.1%}, top-5 error "
              f"{result.top5_error:.1%} ({cfg.eval_views}-view), {rate:.1f} img/s"
              + (f"; lr -> {schedule.lrs[0]:g}" if dropped else ""), flush=True)
        (cfg.out / "history.json").write_text(json.dumps([asdict(h) for h in history], indent=1) + "\n")
        plot_history([asdict(h) for h in history], cfg.out / "curve.png", chance=1 - 1 / manifest.num_classes)
    return history


def main(argv: list[str]) -> int:
    path, overrides = split_config_arg(argv)
    try:
        cfg = load_config(TrainConfig, path, overrides)
        cfg.loader.validate()
    except (ConfigError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except contract.ManifestError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
