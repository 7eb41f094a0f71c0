"""Writing checkpoints: one at a time, optionally in a background thread, and the user's line
when a write fails.  (The file format, atomic saves and pruning: ``service.checkpoint``.)

The loop hands over a payload already copied to the host and goes on training; the next ``save``,
``wait`` or ``check`` raises a failed write as exit 4, so an error in the writer thread is never
lost.  A full disk is named as such, with the space needed and free, and says which older
checkpoints the run will resume from.
"""
from __future__ import annotations

import errno
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.checkpoint import atomic_save, list_checkpoints, path_for, prune
from service.checkpoint_crc import checksum, tensor_bytes
from service.errors import EXIT_CHECKPOINT, ServiceError


def _size(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n:,} bytes"


def write_failure(exc: BaseException, path: Path, needed: int) -> str:
    """The user's line for a failed write of ``path`` (``needed`` bytes) in the run directory: a
    checkpoint, or a log file (``service.runlog``), which fails the same way.  A full disk is named
    as such: torch's zip writer reports it as ``RuntimeError: [enforce fail at
    inline_container.cc:...] unexpected pos``, which says nothing to a person."""
    out = path.parent
    try:
        free = shutil.disk_usage(out).free  # the temporary file is gone: what a retry would have
    except OSError:
        free = None
    full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or (free is not None and free < needed)
    older = [p.name for _, p in list_checkpoints(out)]
    intact = (f"the older checkpoints are intact ({', '.join(older)}): the run resumes from {older[-1]}"
              if older else "there is no older checkpoint")
    if full:
        return (f"the disk is full: {path.name} needs about {_size(needed)}, {_size(free or 0)} are free; {intact}. "
                "Free some space (or move the run directory) and run the same command again")
    return f"{type(exc).__name__}: {exc}; {intact}"


def write_error(out: Path, message: str, rank: int | None = None) -> ServiceError:
    """The exit-4 error for a failed checkpoint write in ``out`` (``message``: ``write_failure``'s
    line; ``rank``: whose write it was, when another rank says it)."""
    by = f"rank {rank}: " if rank is not None else ""
    return ServiceError(EXIT_CHECKPOINT, f"{by}writing a checkpoint in {out} failed: {message}")


class CheckpointWriter:
    """Writes payloads (already on the host) one at a time; optionally in a background thread.

    ``on_written(path, write_seconds)`` runs once a file is durable (in the writer thread).
    A failed write is raised as ``ServiceError`` (exit 4) by the next ``save``, ``wait`` or ``check``,
    or read from ``failure`` by a caller that makes every rank of a job raise it at once
    (``service.checkpointer``: only rank 0 writes).
    """

    def __init__(self, out: Path, keep: int, background: bool,
                 on_written: Callable[[Path, float], None] = lambda path, seconds: None) -> None:
        self.out, self.keep, self.background, self.on_written = out, keep, background, on_written
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def save(self, payload: dict[str, Any], step: int) -> None:
        """Start writing ``payload`` as the checkpoint of ``step`` (after the previous write)."""
        self.wait()
        path = path_for(self.out, step)
        if not self.background:
            self._write(payload, path)  # a failure is raised by the next ``check`` or ``wait``
            return
        self._thread = threading.Thread(target=self._write, args=(payload, path), name="checkpoint", daemon=True)
        self._thread.start()

    def _write(self, payload: dict[str, Any], path: Path) -> None:
        try:
            start = time.perf_counter()
            payload["crc32"] = checksum(payload)
            atomic_save(payload, path)
            prune(self.out, self.keep)
            self.on_written(path, time.perf_counter() - start)
        except BaseException as exc:  # reported to the loop, never lost in the thread
            self._error = write_failure(exc, path, tensor_bytes(payload))

    def join(self) -> None:
        """Block until the write in flight (if any) has ended: durable, or ``failure`` says why not."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> None:
        """Block until the write in flight (if any) is durable; raise its failure."""
        self.join()
        self.check()

    @property
    def failure(self) -> str | None:
        """Why the last write failed, not yet raised; None when it did not (or is still writing)."""
        return self._error

    def check(self) -> None:
        """Raise the error of a failed write, once (a job's ranks: ``CheckpointManager.wait``)."""
        if self._error is not None:
            message, self._error = self._error, None
            raise write_error(self.out, message)
