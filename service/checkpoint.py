"""Checkpoint files: the format and its version, atomic writes, the newest readable file, keep the
last K.  (Writing them in the background: ``service.checkpoint_writer``; what goes into a file and
when: ``service.checkpointer``.)

A checkpoint is ``<out>/checkpoint-<global step>.pt`` (``torch.save`` of plain tensors, numbers,
strings, lists and dicts).  It is written to a temporary file in the same directory, fsynced,
renamed over its final name (``os.replace``, atomic on POSIX) and the directory is fsynced
(SPEC 8): a crash or ``kill -9`` at any moment leaves either the old set of checkpoints or the
new one, plus at most a stale ``.tmp`` file that the next start removes.  Older checkpoints
are deleted only after the new one is durable.

Loading uses ``torch.load(weights_only=True)``: a checkpoint cannot run code.  Each file carries
a CRC-32 of its contents, checked on load: ``torch.load`` alone returns tensors whose bytes were
damaged without complaint.  A file that does not load (truncated, corrupt, not ours) is renamed
``*.corrupt`` once an older one has loaded; at most ``KEEP_CORRUPT`` of them are kept (a
flapping disk must not fill the volume with ~490 MB files).  A file that cannot be *opened or read*
(permissions, an I/O error: ``OSError``) is not damaged and is never set aside: the run is refused
naming it (exit 2), rather than silently rolled back to an older file.  When no checkpoint loads, nothing
is renamed and the run is refused: starting over from step 0 must be asked for
(``--fresh true``), never happen silently.  A checkpoint of another format *version* is not
damaged: it is refused naming both versions, or upgraded where this code knows how.

A name is not trusted over the file: a name that is not a regular file (a FIFO, whose open()
blocks, a directory, a dangling symbolic link: ``service.checkpoint_trust``), a checkpoint whose
stored step is not its name's (copied or renamed by hand) and one of another run are refused
(exit 2) before anything is opened or renamed.
"""
from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from service.checkpoint_crc import checksum
from service.checkpoint_trust import cannot_read, not_a_file, other_run
from service.errors import EXIT_CONFIG, ServiceError

FORMAT = "alexnet2012-service-checkpoint"
# 2: the RNG states of the CUDA devices in use, keyed by device ("cuda:1"); 1 had one state per
# visible GPU, by position.
VERSION = 2
REQUIRED = ("format", "version", "run_id", "config", "identity", "progress", "model", "velocity", "schedule",
            "loaders", "rng", "lr_scale")
NAME = re.compile(r"^checkpoint-(\d{9})\.pt$")
CORRUPT = re.compile(r"^checkpoint-(\d{9})\.pt\.corrupt$")
# The three kinds of checkpoint file as globs: NAME's, CORRUPT's (set aside by ``newest_valid``) and
# ``atomic_save``'s temporary files of unfinished writes; here, next to the names they match, so that
# ``--fresh`` (service.rundir) and the stale-file sweep delete what this module writes.
GLOBS = ("checkpoint-*.pt", "checkpoint-*.pt.corrupt", ".checkpoint-*.tmp")
TEMP_GLOB = GLOBS[2]
KEEP_CORRUPT = 2  # unreadable checkpoints kept for inspection (the newest ones)


class Unreadable(Exception):
    """A checkpoint file that cannot be used; the message says why."""


class OtherVersion(Exception):
    """A sound checkpoint of a format version this code neither reads nor upgrades."""

    def __init__(self, path: Path, version: object) -> None:
        self.path, self.version = path, version
        upgrades = f" (and upgrades {', '.join(f'version {v}' for v in sorted(UPGRADES))})" if UPGRADES else ""
        super().__init__(f"{path} has checkpoint format version {version!r}; this code reads version {VERSION}"
                         f"{upgrades}")

    def refusal(self, predicting: bool = False) -> ServiceError:
        """Exit 2 naming both versions and the ways forward (for ``service.predict``: its own)."""
        newer = "newer " if isinstance(self.version, int) and self.version > VERSION else ""
        if predicting:
            return ServiceError(EXIT_CONFIG, f"{self}. Predict with the {newer}version of the code that wrote it, "
                                "or name another checkpoint with --run")
        return ServiceError(EXIT_CONFIG, f"{self}. Resume it with the {newer}version of the "
                            "service that wrote it, use another --out directory, or start over here with --fresh "
                            f"true (deletes {self.path.parent}'s checkpoints and logs)")


def _upgrade_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """Version 1 saved ``torch.cuda.get_rng_state_all()``: a list by visible GPU index."""
    for rng in payload["rng"]:
        if isinstance(rng.get("cuda"), list):
            rng["cuda"] = {f"cuda:{i}": state for i, state in enumerate(rng["cuda"])}
    payload["version"] = 2
    return payload


UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _upgrade_v1}  # version -> the next one


def path_for(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step:09d}.pt"


def list_checkpoints(out: Path, pattern: re.Pattern = NAME) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in ``out`` (or every file ``pattern`` names), oldest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := pattern.match(p.name))]
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


def _load_error(exc: Exception, path: Path) -> str:
    """Why ``torch.load`` refused ``path``, in one line.  torch's own message for a pickle that
    names Python objects ends with advice to load it with ``weights_only=False``, i.e. to run
    whatever code an untrusted file carries: that advice is never passed on.  A pickle naming an
    object says so, zip or not (torch reads old-style pickles); any other failure of a file that
    is no ``torch.save`` archive at all (a JPEG's bytes read as a pickle's) says that instead."""
    text = str(exc)
    refused = "weights_only" in text or "Weights only load failed" in text
    named = re.search(r"GLOBAL ([\w.]+)", text) if refused else None
    if named is None and (problem := _not_an_archive(path)):
        return problem
    if refused:
        what = f"the Python object {named.group(1)}" if named else "Python objects"
        return (f"it names {what}, which no checkpoint of this service contains; not loaded, "
                "as loading it could run code")
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _not_an_archive(path: Path) -> str | None:
    """Why ``path`` is no ``torch.save`` file at all (empty, or not the zip archive every checkpoint
    is), or None: torch's own errors for those ("EOFError: ", an unpickler's "Unsupported operand")
    read as damage or as a pickle naming code."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        return None if zipfile.is_zipfile(path) else "not a torch.save archive (a checkpoint is a zip file)"
    except OSError:
        return None


def load(path: Path) -> dict[str, Any]:
    """A checkpoint's payload (tensors on the CPU), upgraded to ``VERSION``; ``Unreadable`` if it
    is not a usable one, ``OtherVersion`` if it is a sound file of a version this code cannot read,
    ``ServiceError`` (exit 2) if it is not a regular file."""
    if (refusal := not_a_file(path)) is not None:
        raise refusal
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # EACCES, EIO, EMFILE...: says nothing about the file's contents (see cannot_read)
    except Exception as exc:  # truncated zip, bad pickle, a forbidden global: all "unreadable"
        raise Unreadable(_load_error(exc, path)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise Unreadable("not a checkpoint of this service")
    if payload.get("version") != VERSION and payload.get("version") not in UPGRADES:
        raise OtherVersion(path, payload.get("version"))
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise Unreadable(f"missing {', '.join(missing)}")
    if payload.get("crc32") != checksum(payload):
        raise Unreadable("checksum mismatch: the file was damaged after it was written")
    while payload["version"] != VERSION:
        payload = UPGRADES[payload["version"]](payload)
    return payload


def scan(out: Path) -> tuple[tuple[Path, dict[str, Any]] | None, list[tuple[Path, str]]]:
    """The newest checkpoint that loads, and the (path, reason) of the unreadable newer ones.
    Changes nothing on disk.  A file of another format version (``OtherVersion``: each caller
    refuses it with its own advice), or one that cannot be opened or read, or whose stored step is
    not its name's (exit 2), stops the search: the older files would silently lose its progress.
    Every name is looked at first (``os.stat``, cheap): one that is not a regular
    file is refused even when older, as pruning would later fail to delete it."""
    listed = list_checkpoints(out)
    for _, path in listed:
        if (refusal := not_a_file(path)) is not None:
            raise refusal
    unreadable = []
    for step, path in reversed(listed):
        try:
            payload = load(path)
            if (refusal := wrong_step(path, step, payload)) is not None:
                raise refusal
            return (path, payload), unreadable
        except Unreadable as exc:
            unreadable.append((path, str(exc)))
        except OSError as exc:
            raise cannot_read(path, exc) from None
    return None, unreadable


def wrong_step(path: Path, named: int, payload: dict[str, Any]) -> ServiceError | None:
    """Exit 2 for a checkpoint whose stored step is not its name's.  The name alone chooses the
    newest file, so a step-6 file named ``-50`` was resumed at every start and what was trained
    after step 6 was thrown away each time.  Refused, not set aside as ``.corrupt``: it is a sound
    file put there by hand (a copy, a rename), setting it aside would resume an older file without
    asking and, with ``KEEP_CORRUPT``, delete it later; only its owner knows which is meant."""
    stored = payload["progress"].get("step") if isinstance(payload["progress"], dict) else None
    if stored == named:
        return None
    right = path_for(path.parent, stored) if isinstance(stored, int) and stored >= 0 else None
    advice = f"Rename it to {right.name} or remove it" if right and not right.exists() else "Remove it"
    return ServiceError(EXIT_CONFIG, f"checkpoint {path} is named for step {named} but holds step {stored} (copied or "
                        f"renamed by hand?); nothing was changed and no other checkpoint is used instead. {advice}, "
                        "and run the same command again")


def newest_valid(out: Path, log: Callable[[str], None], last_start: dict[str, Any] | None = None
                 ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``out`` that loads, the unreadable newer ones set aside
    (``*.corrupt``); None when there is no checkpoint.  ``ServiceError`` (exit 2) when there are
    checkpoints and none loads, the newest is of another version or of another run than the
    directory's (its log's ``last_start`` event, if any): nothing is renamed then."""
    try:
        found, unreadable = scan(out)
    except OtherVersion as exc:
        raise exc.refusal() from None
    if found is not None and (refusal := other_run(*found, last_start)) is not None:
        raise refusal
    if found is None and unreadable:
        listed = "; ".join(f"{p.name} ({why})" for p, why in unreadable)
        raise ServiceError(EXIT_CONFIG, f"no checkpoint in {out} can be read: {listed}. Nothing was changed. Restore "
                           "them from a copy, or start over with --fresh true (deletes them and the logs)")
    for path, why in unreadable:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        log(f"checkpoint {path} is unreadable ({why}); moved to {aside.name}, trying the previous one")
    for path in prune(out, KEEP_CORRUPT, CORRUPT):
        log(f"deleted {path.name}: only the newest {KEEP_CORRUPT} unreadable checkpoints are kept for inspection")
    return found


def remove_stale_temps(out: Path) -> list[Path]:
    """Temporary files of writes that never finished (a crash or kill -9 while writing)."""
    stale = list(out.glob(TEMP_GLOB)) if out.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def prune(out: Path, keep: int, pattern: re.Pattern = NAME) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (or files ``pattern`` names, e.g.
    ``CORRUPT``); returns what was deleted."""
    old = [p for _, p in list_checkpoints(out, pattern)[:-keep]]
    for p in old:
        p.unlink(missing_ok=True)
    return old
