"""A run's id, and a run directory its user copied (``cp -a runs/r1 runs/r2``, then the service
started on runs/r2).

A new run's id is its directory's name and its start time (``r1-20261202-170000``): it names the
run in each ``start`` event, /status and every checkpoint, and a restart keeps it (its
checkpoint's).  A copy holds the same checkpoints, so it resumed under the original's id: two runs
training apart under one id, their logs, events and dashboards mixed.

What makes a directory the same one is its inode number, recorded with its resolved path
(``run_dir``, said in messages) in every checkpoint and ``start`` event.  ``cp`` makes a new
directory, ``mv`` within a file system renames the same one: a moved or renamed directory keeps
its id without a word.  Neither the path (the containers mount every run directory at
/runs/run; a directory moved is the same run) nor the device number (an NFS client's changes at
each mount and differs between nodes) can tell.  The costs of that choice: a directory moved to
another file system (``mv`` copies then) or restored from a backup counts as a copy, and so would
each mount of a file system without stable inode numbers (some FUSE ones).  Said in one line and
harmless: a new id for one run is better than one id for two.

A copy trains as ``<its directory's name>-copy-<start time>``: apart from the original's wherever
new runs' ids are (two copies started in the same second in directories of other names too), and
a copy of a copy does not grow it; its ``start`` events name the run it came from (``copied_from``).
Until the copy writes a checkpoint of its own, its newest is still the original's: the copy's run
is then its log's last ``start`` (written in this directory, copied from that run), so a restart
keeps the copy's id rather than taking another or being refused as another run's
(``service.checkpoint_trust.other_run``).  Checkpoints written before ``run_dir`` was recorded
cannot tell a copy: they resume under their id, as before.  Rank 0 alone decides (another node may
mount the directory elsewhere), and every rank takes its id (``service.checkpointer``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def new_run_id(out: Path, copy: bool = False) -> str:
    """The id of a run starting now in ``out`` (``copy``: a copy's, see the module docstring)."""
    return f"{out.resolve().name}{'-copy' if copy else ''}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_dir(out: Path) -> dict[str, Any]:
    """What checkpoints and ``start`` events record of the run directory: its inode (compared) and
    resolved path (said)."""
    return {"path": str(out.resolve()), "inode": os.stat(out).st_ino}


def _inode(record: Any) -> int | None:
    return record.get("inode") if isinstance(record, dict) else None


@dataclass(frozen=True)
class Continued:
    """The run a start continues from a checkpoint."""

    run_id: str  # the id it trains under
    copied_from: str | None = None  # a copy: the run whose checkpoint it resumes
    original: str | None = None  # a copy: the directory that checkpoint was written in


def continued(out: Path, payload: dict[str, Any], last_start: dict[str, Any] | None) -> Continued | None:
    """The run that ``payload``, the newest checkpoint in ``out``, continues there; None when it is
    another run's than the directory's (its log's ``last_start``): refused, ``other_run``."""
    theirs, written = payload["run_id"], _inode(payload.get("run_dir"))
    last = last_start or {}
    ours, came_from = last.get("run_id"), last.get("copied_from")
    here = os.stat(out).st_ino
    if written is None or written == here:  # this directory's checkpoint, or one that cannot tell
        return Continued(theirs) if last_start is None or ours == theirs else None
    original = payload["run_dir"].get("path")
    if came_from == theirs and _inode(last.get("run_dir")) == here:  # a copy's restart before its own checkpoint
        return Continued(ours, theirs, original)
    if last_start is None or theirs in (ours, came_from):  # a copy's first start (of a copy's too)
        return Continued(new_run_id(out, copy=True), theirs, original)
    return None
