"""Checkpoint files: atomic writes, the newest readable one, keep the last K, write in the background.

A checkpoint is ``<out>/checkpoint-<global step>.pt`` (``torch.save`` of plain tensors, numbers,
strings, lists and dicts).  It is written to a temporary file in the same directory, fsynced,
renamed over its final name (``os.replace``, atomic on POSIX) and the directory is fsynced
(SPEC 8): a crash or ``kill -9`` at any moment leaves either the old set of checkpoints or the
new one, plus at most a stale ``.tmp`` file that the next start removes.  Older checkpoints
are deleted only after the new one is durable.

Loading uses ``torch.load(weights_only=True)``: a checkpoint cannot run code.  A file that
does not load (truncated, corrupt, not ours) is renamed ``*.corrupt`` (kept for inspection,
out of the rotation) and the previous one is tried.

Each file carries a CRC-32 of its contents, checked on load: ``torch.load`` alone returns
tensors whose bytes were damaged without complaint.

The loop is blocked only while the state is copied to host memory (``HostBuffers``); with
``background=True`` the serialisation, fsync and rename run in a thread, one at a time.
"""
from __future__ import annotations

import os
import re
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from service.errors import EXIT_CHECKPOINT, ServiceError

FORMAT = "alexnet2012-service-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "run_id", "config", "identity", "progress", "model", "velocity", "schedule",
            "loaders", "rng", "lr_scale")
NAME = re.compile(r"^checkpoint-(\d{9})\.pt$")


class Unreadable(Exception):
    """A checkpoint file that cannot be used; the message says why."""


def path_for(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step:09d}.pt"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in ``out``, oldest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := NAME.match(p.name))]
    return sorted(found)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def load(path: Path) -> dict[str, Any]:
    """A checkpoint's payload (tensors on the CPU); ``Unreadable`` if it is not a usable one."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, a forbidden global: all "unreadable"
        raise Unreadable(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise Unreadable("not a checkpoint of this service")
    if payload.get("version") != VERSION:
        raise Unreadable(f"checkpoint format version {payload.get('version')!r}, this code reads {VERSION}")
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise Unreadable(f"missing {', '.join(missing)}")
    if payload.get("crc32") != checksum(payload):
        raise Unreadable("checksum mismatch: the file was damaged after it was written")
    return payload


def newest_valid(out: Path, log: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``out`` that loads; unreadable newer ones are set aside."""
    for _, path in reversed(list_checkpoints(out)):
        try:
            return path, load(path)
        except Unreadable as exc:
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            log(f"checkpoint {path} is unreadable ({exc}); moved to {aside.name}, trying the previous one")
    return None


def remove_stale_temps(out: Path) -> list[Path]:
    """Temporary files of writes that never finished (a crash or kill -9 while writing)."""
    stale = [p for p in out.glob(".checkpoint-*.tmp")] if out.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def prune(out: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns what was deleted."""
    old = [p for _, p in list_checkpoints(out)[:-keep]]
    for p in old:
        p.unlink(missing_ok=True)
    return old


class HostBuffers:
    """Host copies of device tensors in buffers that are reused from one checkpoint to the next.

    Why reuse: a fresh 460 MB host allocation is touched page by page on its first write (0.65 s
    on the 2-core VM for AlexNet's weights + velocities), a reused one copies in 0.03 s.  On a
    GPU the buffers are pinned, so the device-to-host copies run at full PCIe speed.  Callers
    must not refill the buffers while a write of their previous contents is in flight
    (``CheckpointWriter.wait`` first).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` copied into this object's host buffers (same keys)."""
        out = {}
        for key, t in tensors.items():
            name = f"{prefix}/{key}"
            buf = self._buffers.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
                self._buffers[name] = buf
            out[key] = buf.copy_(t.detach(), non_blocking=t.is_cuda)
        return out

    @staticmethod
    def ready() -> None:
        """Wait for the asynchronous device-to-host copies (a no-op without CUDA)."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()


def _skeleton_and_tensors(value: Any, tensors: list[torch.Tensor]) -> Any:
    """The payload with each tensor replaced by its dtype and shape (tensors collected in order)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return f"tensor({value.dtype}, {tuple(value.shape)})"
    if isinstance(value, dict):
        return {k: _skeleton_and_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_skeleton_and_tensors(v, tensors) for v in value]
    return value


def checksum(payload: dict[str, Any]) -> int:
    """CRC-32 of everything in ``payload`` except its ``crc32`` key: structure, values, tensor bytes.

    ``torch.load`` happily returns tensors whose bytes were damaged on disk; this is how a corrupt
    checkpoint is told from a good one (about 0.2 s per 460 MB).
    """
    tensors: list[torch.Tensor] = []
    skeleton = _skeleton_and_tensors({k: v for k, v in payload.items() if k != "crc32"}, tensors)
    crc = zlib.crc32(repr(skeleton).encode())
    for t in tensors:
        crc = zlib.crc32(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy(), crc)
    return crc


class CheckpointWriter:
    """Writes payloads (already on the host) one at a time; optionally in a background thread.

    ``on_written(path, write_seconds)`` runs once a file is durable (in the writer thread).
    A failed write is raised as ``ServiceError`` by the next ``save``, ``wait`` or ``check``.
    """

    def __init__(self, out: Path, keep: int, background: bool,
                 on_written: Callable[[Path, float], None] = lambda path, seconds: None) -> None:
        self.out, self.keep, self.background, self.on_written = out, keep, background, on_written
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, payload: dict[str, Any], step: int) -> None:
        """Start writing ``payload`` as the checkpoint of ``step`` (after the previous write)."""
        self.wait()
        path = path_for(self.out, step)
        if not self.background:
            self._write(payload, path)
            self.check()
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
            self._error = exc

    def wait(self) -> None:
        """Block until the write in flight (if any) is durable."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    def check(self) -> None:
        """Raise the error of a failed write (cheap: the loop calls it every step)."""
        if self._error is not None:
            exc, self._error = self._error, None
            raise ServiceError(EXIT_CHECKPOINT, f"writing a checkpoint in {self.out} failed: "
                               f"{type(exc).__name__}: {exc}") from exc
