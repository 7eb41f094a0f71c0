"""Checkpoint contents in and out of a running ``Trainer``: what is saved, and how a run continues
from it, also on another number of ranks.

Same ranks, same graph: the exact position (every rank's loader state and RNG state).  Another
number of ranks (or a checkpoint from the other decode graph): the weights, velocities, schedule
and counters carry over, the data is split anew and an interrupted epoch restarts from its first
step (said in the log), and the lrs move to this run's rule (``optim.lr_scaling``).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import to_dict
from model import EvalResult, load_velocity_state, velocity_state
from service import checkpoint as ckpt
from service.build import Parts
from service.state import check_identity, progress_from, set_rng_state

if TYPE_CHECKING:
    from service.loop import Trainer


def combine(results: list[EvalResult]) -> EvalResult:
    """One evaluation from every rank's share of the validation split (weighted by images)."""
    n = sum(r.images for r in results)
    if len(results) == 1 or n == 0:
        return results[0]
    mean = {k: sum(getattr(r, k) * r.images for r in results) / n for k in ("top1_error", "top5_error", "loss")}
    return EvalResult(mean["top1_error"], mean["top5_error"], mean["loss"], n)


def rescale_lrs(parts: Parts, saved_scale: float) -> None:
    """The saved lrs were for the saved global batch: move them to this run's lr rule."""
    if saved_scale != parts.lr_scale:
        for group in parts.optimizer.param_groups:
            group["lr"] *= parts.lr_scale / saved_scale


def restore(trainer: Trainer, path: Path, payload: dict[str, Any]) -> None:
    """Continue from ``payload`` (from ``path``) if it belongs to this run; ConfigMismatch if not."""
    check_identity(path, payload["identity"], trainer.identity)
    parts = trainer.parts
    parts.model.load_state_dict(payload["model"])
    load_velocity_state(parts.model, parts.optimizer, payload["velocity"])
    parts.schedule.load_state_dict(payload["schedule"])
    if parts.scaler is not None and payload.get("scaler"):
        parts.scaler.load_state_dict(payload["scaler"])
    trainer.progress = progress_from(payload["progress"])
    rescale_lrs(parts, payload["lr_scale"])
    if not _restore_position(trainer, path, payload):
        trainer.progress.start_epoch()  # the interrupted epoch's data is taken again from its start
    trainer.run_id = payload["run_id"]
    trainer.saved_at = (trainer.progress.step, trainer.progress.evaluated)
    trainer.metrics.last_checkpoint.set(payload["time"])
    trainer.board.update(last_checkpoint={"path": str(path), "time": payload["time"]})
    if trainer.progress.history:
        trainer.report_evaluation(trainer.progress.history[-1])


def _restore_position(trainer: Trainer, path: Path, payload: dict[str, Any]) -> bool:
    """This rank's loader position and RNG state from ``payload``; False (with a warning) when
    they cannot apply: written by another number of ranks, or by another decode graph."""
    loaders, rank, ranks = payload["loaders"], trainer.ranks.rank, trainer.ranks.world_size
    if len(loaders) != ranks:
        trainer.log.warn(f"{path} was written by {len(loaders)} rank(s), this run has {ranks}: the data is "
                         "split anew, and an interrupted epoch restarts from its first step")
        return False
    try:
        trainer.parts.train.load_state_dict(loaders[rank])
    except ValueError as exc:
        trainer.log.warn(f"{path}: the training loader's saved position does not fit this run ({exc}); "
                         "an interrupted epoch restarts from its first step")
        return False
    set_rng_state(payload["rng"][rank])
    return True


def payload(trainer: Trainer, reason: str, loaders: list[dict], rngs: list[dict]) -> dict[str, Any]:
    """The checkpoint of this moment (the loop waits only for the copy to host buffers)."""
    parts = trainer.parts
    payload = {
        "format": ckpt.FORMAT, "version": ckpt.VERSION, "run_id": trainer.run_id, "reason": reason,
        "time": time.time(), "config": to_dict(trainer.cfg), "identity": trainer.identity,
        "progress": dataclasses.asdict(trainer.progress),
        "model": trainer.buffers.copy("model", parts.model.state_dict()),
        "velocity": trainer.buffers.copy("velocity", velocity_state(parts.model, parts.optimizer, copy=False)),
        "schedule": parts.schedule.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "loaders": loaders, "rng": rngs, "lr_scale": parts.lr_scale,
    }
    trainer.buffers.ready()
    return payload
