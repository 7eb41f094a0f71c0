"""The run's own state in a checkpoint: the progress counters and history, and the run's
*identity*: the recipe keys of the config plus a fingerprint of the data.  A restart resumes
only a checkpoint with the same identity (``check_identity``).  A digest of the weights
(``param_digest``) shows at the end of a data-parallel run that its replicas never parted.

The other parts of a checkpoint belong to their owners (model, momentum, schedule, scaler,
loader position, ``service.rng``); ``service.checkpointer`` puts them together.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.config import to_dict
from model import EvalResult
from service import data_stats
from service.config import OPERATIONAL, TrainConfig
from service.errors import ConfigMismatch
from service.metric_logger import Window


@dataclass
class Progress:
    """Counters that make resume exact (saved in every checkpoint)."""

    epoch: int = 0  # epochs whose training part is complete
    evaluated: int = 0  # epochs whose evaluation is complete (== epoch except during evaluation)
    step: int = 0  # optimizer steps since the run started (global, survives restarts)
    step_in_epoch: int = 0  # steps done in the epoch being trained (epoch + 1)
    epoch_loss_sum: float = 0.0  # sum of the step losses so far in this epoch (for the epoch mean)
    # Steps of this epoch whose batch was empty (a rank whose share of an uneven split ended a batch
    # early: pipeline.loader): they have no loss of their own and are left out of the epoch mean,
    # which counted them as 0 (9 images on 2 ranks at batch 4: rank 0's train loss was halved).
    # Only an epoch's last step can be one, so a checkpoint without the field had none.
    epoch_empty_steps: int = 0
    epoch_images: int = 0  # images and seconds so far in this epoch (for its images/s)
    epoch_seconds: float = 0.0
    epoch_data_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per evaluated epoch

    def epoch_record(self, lr: float, result: EvalResult, eval_seconds: float, views: int) -> dict[str, Any]:
        """The history record of the epoch just trained and evaluated; its training rates by the
        log lines' rule (``Window``), over the whole epoch."""
        trained = Window(self.step_in_epoch, self.epoch_images, self.epoch_seconds, self.epoch_data_seconds)
        return dict(epoch=self.epoch, lr=lr, train_loss=self.epoch_loss_sum / max(self.step_in_epoch - self.epoch_empty_steps, 1),
                    top1_error=result.top1_error, top5_error=result.top5_error, val_loss=result.loss,
                    images_per_s=trained.images_per_s, data_share=trained.data_share, eval_seconds=eval_seconds,
                    eval_views=views,
                    eval_views_per_s=result.images * views / max(eval_seconds, 1e-9))

    def past(self, epochs: int) -> bool:
        """Whether the run has trained beyond ``epochs`` (a restart asked for fewer than were done):
        more epochs evaluated, or steps of the next one trained."""
        return self.evaluated > epochs or self.epoch > self.evaluated or self.step_in_epoch > 0

    def start_epoch(self) -> None:
        self.step_in_epoch = self.epoch_empty_steps = 0
        self.epoch_loss_sum, self.epoch_images, self.epoch_seconds, self.epoch_data_seconds = 0.0, 0, 0.0, 0.0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """In place (the loop holds this object); a counter the checkpoint lacks starts at its default."""
        default = Progress()
        for f in dataclasses.fields(self):
            setattr(self, f.name, saved.get(f.name, getattr(default, f.name)))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys (``optim.lr``): the keys the messages name."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _operational(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in OPERATIONAL)


def data_fingerprint(manifest_record: dict[str, Any]) -> str:
    """The data's identity: the classes and every shard's checksum (not the directory's path)."""
    splits = {name: [s["sha256"] for s in entry["shards"]] for name, entry in manifest_record["splits"].items()}
    classes = [c["wnid"] for c in manifest_record["classes"]]
    blob = json.dumps({"classes": classes, "splits": splits}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def identity(cfg: TrainConfig, fingerprint: str, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keys a resumed run must share with its checkpoint.  Not the number of ranks: a run
    may resume on more or fewer (the data is split anew: ``service.checkpointer``).  ``stats``:
    the summary of the dataset statistics it trains with (``service.data_stats``)."""
    recipe = {k: v for k, v in flatten(to_dict(cfg)).items() if not _operational(k)}
    return {**recipe, "data": fingerprint, **({"data_stats": stats} if stats is not None else {})}


def check_identity(path: Path, saved: dict[str, Any], mine: dict[str, Any]) -> None:
    """Refuse to resume ``path`` when its identity differs from this run's (naming the keys).
    The statistics are compared with a tolerance, and only where the checkpoint has them."""
    keys = sorted((set(saved) | set(mine)) - {"data_stats"})
    described = [_describe(k, saved.get(k), mine.get(k)) for k in keys if saved.get(k) != mine.get(k)]
    if stats := data_stats.difference(saved.get("data_stats"), mine.get("data_stats")):
        described.append(data_stats.describe(None, stats))
    if not described:
        return
    more = f" (and {len(described) - 4} more)" if len(described) > 4 else ""
    raise ConfigMismatch(f"{path} belongs to another run: {'; '.join(described[:4])}{more}. Resume with the same "
                         f"settings and shards, use another --out directory, or start over here with --fresh true "
                         f"(deletes {path.parent}'s checkpoints and logs)")


def _describe(key: str, saved: Any, mine: Any) -> str:
    if key == "data":
        return f"the shards differ (data fingerprint {saved} there, {mine} here)"
    return f"{key} is {saved!r} there and {mine!r} here"


def param_digest(model: torch.nn.Module) -> str:
    """A short hash of the weights: equal on every rank of a data-parallel run (logged when the
    run ends on several ranks, where it shows the replicas never diverged)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
