"""What ``python -m service.predict`` reads of a run: its newest readable checkpoint (or the one
named), and the shards that checkpoint was trained on, found from its config and checked by their
data fingerprint (another dataset's mean image or class order would give confident, wrong
answers).  Each refusal is a ``ServiceError`` (exit 2) saying what to do; nothing in the run
directory is changed (unreadable checkpoints are skipped, not set aside as the service does)."""
from __future__ import annotations

import os
from pathlib import Path

from service.checkpoint import TEMP_GLOB, OtherVersion, Unreadable, load, scan
from service.checkpoint_trust import cannot_read, not_a_file
from service.errors import EXIT_CONFIG, ServiceError
from service.state import data_fingerprint
from shards import manifest as contract


def newest_checkpoint(run: Path) -> tuple[Path, dict]:
    """``run`` itself when it is a checkpoint file, else the newest readable one in the directory."""
    if run.is_file():
        try:
            return run, load(run)
        except Unreadable as exc:
            raise ServiceError(EXIT_CONFIG, f"--run {run}: not a readable checkpoint: {exc}") from None
        except OtherVersion as exc:
            raise exc.refusal(predicting=True) from None
        except OSError as exc:
            raise cannot_read(run, exc) from None
    if not run.is_dir():
        if os.path.lexists(run) and (refusal := not_a_file(run)) is not None:  # a FIFO, a symbolic link loop...
            raise refusal
        raise ServiceError(EXIT_CONFIG, f"--run {run}: no such run directory or checkpoint file")
    try:
        found, unreadable = scan(run)
    except OtherVersion as exc:
        raise exc.refusal(predicting=True) from None
    if found is None:
        raise ServiceError(EXIT_CONFIG, f"--run {run}: {_none_readable(run, unreadable)}")
    return found


def _none_readable(run: Path, unreadable: list[tuple[Path, str]]) -> str:
    """Why a run directory has no checkpoint to predict with, and what to do: damaged ones, one
    still being written (a run in its first epoch, or a write a crash cut short), or none yet."""
    if unreadable:
        return (f"none of its {len(unreadable)} checkpoint(s) can be read ({unreadable[0][0].name}: "
                f"{unreadable[0][1]}): restore one from a copy, or name another checkpoint with --run")
    if writing := sorted(p.name for p in run.glob(TEMP_GLOB)):
        return (f"no checkpoint-*.pt in it yet, only {writing[0]}: a checkpoint being written (wait for it), or a "
                "write a crash cut short")
    return "no readable checkpoint-*.pt in it: train first (python -m service --out ...) or name a checkpoint file"


def trained_on(cfg: dict, shards: Path | None, checkpoint: Path, fingerprint: str) -> contract.Manifest:
    """The shards ``checkpoint`` was trained on: ``shards`` (--shards), else its config's path, an
    absolute one as it is (the service records them absolute), a relative one (runs of an older
    service, which recorded make demo's data/shards as given) from the directory training started
    in, or from here where the run directory has moved since."""
    recorded = Path(cfg["shards"])
    started = None if shards is not None or recorded.is_absolute() else _started_in(cfg, checkpoint.parent)
    if started is not None and not (started / recorded / "manifest.json").exists() and \
            (recorded / "manifest.json").exists():
        started = None  # the run directory moved since; the shards are where they were from here
    root = shards or (started / recorded if started is not None else recorded)
    return _matching_shards(root, fingerprint, checkpoint, None if started is None else (recorded, started))


def _started_in(cfg: dict, run: Path) -> Path | None:
    """The directory training was started in, when the config's ``out`` is relative and ``run``
    (the checkpoint's directory) ends with it: ``runs/demo`` at ``/x/runs/demo`` was started in ``/x``."""
    out = Path(cfg.get("out") or "")
    if out.is_absolute() or not out.parts:
        return None
    here = run.resolve()
    return Path(*here.parts[:-len(out.parts)]) if here.parts[-len(out.parts):] == out.parts else None


def _matching_shards(root: Path, fingerprint: str, checkpoint: Path,
                     relative: tuple[Path, Path] | None = None) -> contract.Manifest:
    """The shards the checkpoint was trained on (their manifest), or one line saying why not.
    ``relative``: (the config's relative shards path, the directory training started in) when
    ``root`` was found that way."""
    try:
        manifest = contract.load(root, splits=("train",))
    except contract.ManifestError as exc:
        why = str(exc)
        if relative is not None and not (root / "manifest.json").exists():  # not "re-shard ImageNet there"
            why = (f"its config names {relative[0]}, relative to the directory training started in ({relative[1]}), "
                   f"and {root} has no manifest.json")
        raise ServiceError(EXIT_CONFIG, f"the shards the model was trained on are needed for its classes and mean "
                           f"image: {why}; name them with --shards") from None
    if data_fingerprint(manifest.record) != fingerprint:
        raise ServiceError(EXIT_CONFIG, f"{root} are not the shards {checkpoint.name} was trained on (data "
                           f"fingerprint {data_fingerprint(manifest.record)}, the checkpoint's {fingerprint}): "
                           "their classes or mean image would not be the model's; name the right ones with --shards")
    return manifest
