"""The run directory's human- and machine-readable record.

- the console: one readable line per log interval, evaluation, checkpoint and event;
- ``log.jsonl``: one JSON object per line with an ``event`` field (``train`` per log interval,
  ``eval``, ``checkpoint``, ``start``, ``resume``, ``stop``...): what the metrics say, readable
  without Prometheus, appended across restarts;
- ``config.json``: the resolved configuration of the latest start;
- ``history.json`` and ``curve.png``: one record per evaluated epoch, refreshed after each
  evaluation and at the end.

Only rank 0 writes the history and the curve; every rank writes its own JSON log
(``log.rank<r>.jsonl`` for rank r > 0).

A log or JSON file that cannot be written (a full disk, an I/O error) stops the run as a failed
checkpoint write does: exit 4 and one line saying so (``service.checkpoint_writer.write_failure``), not
an ``OSError`` traceback.  The checkpoints on disk are intact and the run resumes from them.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common.streams import silence
from service.checkpoint_writer import write_failure
from service.errors import EXIT_CHECKPOINT, ServiceError
from service.plot import plot_history


def memory() -> dict[str, int]:
    """Resident set size now and its peak (``VmRSS``/``VmHWM`` in Linux's /proc; empty elsewhere)."""
    fields = {"VmRSS:": "rss_bytes", "VmHWM:": "peak_rss_bytes"}
    try:
        with open("/proc/self/status") as f:
            return {fields[p[0]]: int(p[1]) * 1024 for p in (line.split() for line in f) if p and p[0] in fields}
    except (OSError, ValueError, IndexError):
        return {}


_GONE: set[int] = set()  # console file descriptors whose reader went away


def _emit(line: str, fd: int) -> None:
    """Print ``line`` to stdout (fd 1) or stderr (fd 2), surviving a console that is gone.

    A closed terminal (SIGHUP: the service then stops with a checkpoint) makes every later write
    to it fail with EIO, a closed pipe with EPIPE: the stream is pointed at /dev/null (so neither
    the unwritten buffer nor the interpreter's last flush fails again) and stdout's lines go to
    stderr, which may still be a file (``2>err.log``); the JSON log records everything anyway.
    """
    if fd == 1 and 1 in _GONE:
        fd = 2
    if fd in _GONE:
        return
    try:
        stream = sys.stdout if fd == 1 else sys.stderr
        stream.write(line + "\n")  # one write (not print's two): the ranks of a job share the console
        stream.flush()
        return
    except OSError:
        silence(fd)
        _GONE.add(fd)
    if fd == 1:
        _emit(line, 2)


class RunLog:
    """Writes the console lines and the JSON log of one process."""

    def __init__(self, out: Path, suffix: str = "", console: bool = True) -> None:
        self.out = out
        self.console = console
        self.jsonl_path = out / f"log{suffix}.jsonl"
        self._jsonl = None
        self._lock = threading.Lock()  # the checkpoint writer thread logs too
        self._failure: ServiceError | None = None  # a failed JSON log write, for the main thread to raise
        self._extra: dict[str, Any] = {}  # other JSON-lines files (``append``), by name

    def open(self) -> RunLog:
        self.out.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.jsonl_path, "a", buffering=1)  # line-buffered: a crash loses no line
        return self

    def last_start(self) -> dict[str, Any] | None:
        """This log's latest ``start`` event: the run directory's run (its ``run_id``: a resumed run
        keeps its checkpoint's, ``--fresh`` deletes the log; ``service.run_ids``); None before its
        first start."""
        try:
            with open(self.jsonl_path, errors="replace") as f:
                starts = [line for line in f if '"event": "start"' in line]
        except OSError:
            return None
        for line in reversed(starts):
            try:
                event = json.loads(line)
            except ValueError:  # a line cut short by a crash
                continue
            if isinstance(event, dict) and isinstance(event.get("run_id"), str):
                return event
        return None

    def say(self, line: str) -> None:
        """A console line (stdout, flushed: logs are read live by people and tests)."""
        if self.console:
            _emit(line, 1)

    def warn(self, line: str) -> None:
        _emit(line, 2)

    def event(self, kind: str, **fields: Any) -> None:
        """One JSON line: {"time": unix seconds, "event": kind, ...fields}.  A write that fails is
        raised in the main thread, now or at its next event or ``close``: other threads log too
        (the checkpoint writer, the shard check), and an exception would only end their thread."""
        record = {"time": round(time.time(), 3), "event": kind, **fields}
        line = json.dumps(record, default=str) + "\n"
        with self._lock:
            if self._jsonl is not None:
                try:
                    self._jsonl.write(line)
                except OSError as exc:
                    self._abandon()
                    self._failure = _failed(exc, self.jsonl_path, len(line))
        self._raise_failure()

    def _raise_failure(self) -> None:
        """The failed write, once, if this is the main thread (later events are not written)."""
        if self._failure is not None and threading.current_thread() is threading.main_thread():
            failure, self._failure = self._failure, None
            raise failure

    def append(self, name: str, record: dict[str, Any]) -> None:
        """One JSON line appended to ``out/name`` and flushed (the main thread's own records, such
        as ``--debug.ids``'s sample ids); a failed write is exit 4 like the JSON log's."""
        path = self.out / name
        line = json.dumps(record, default=str) + "\n"
        try:
            if name not in self._extra:
                self._extra[name] = open(path, "a")
            f = self._extra[name]
            f.write(line)
            f.flush()
        except OSError as exc:
            self._close_extra(name)
            raise _failed(exc, path, len(line)) from None

    def _close_extra(self, name: str) -> None:
        try:
            if (f := self._extra.pop(name, None)) is not None:
                f.close()
        except OSError:  # its unwritten buffer on a full disk: the failure was said already
            pass

    def write_json(self, name: str, value: Any) -> Path:
        """``out/name`` replaced atomically (readers never see half a file)."""
        path = self.out / name
        tmp = path.with_name(f".{name}.tmp")
        text = json.dumps(value, indent=1, default=str) + "\n"
        try:
            tmp.write_text(text)
            tmp.replace(path)
        except OSError as exc:
            _discard(tmp)
            raise _failed(exc, path, len(text)) from None
        return path

    def history(self, records: list[dict[str, Any]], chance: float) -> Path:
        """history.json and curve.png from the per-epoch records; returns the curve's path.  A
        curve that cannot be drawn is said and skipped: the epoch's checkpoint comes after this,
        and a plot is not worth an epoch of training."""
        self.write_json("history.json", records)
        curve = self.out / "curve.png"
        if records:
            tmp = self.out / ".curve.tmp.png"
            try:
                plot_history(records, tmp, chance=chance)
                tmp.replace(curve)
            except Exception as exc:  # matplotlib missing or failing, a font cache it cannot write
                self.warn(f"{curve} not drawn ({type(exc).__name__}: {exc}); {self.out / 'history.json'} "
                          "has the numbers")
        return curve

    def history_as_resumed(self, records: list[dict[str, Any]], chance: float, source: Path) -> None:
        """history.json and curve.png as the checkpoint ``source`` has them, when they list other
        epochs: a run resumed from an older checkpoint (the newest deleted, or damaged and set
        aside) trains the lost epochs again, and a stop before their evaluation left the files
        showing epochs no checkpoint holds."""
        path = self.out / "history.json"
        try:
            listed = [r["epoch"] for r in json.loads(path.read_text())]
        except (OSError, ValueError, TypeError, KeyError):
            listed = None  # none yet, or unreadable: written again at the next evaluation
        mine = [r["epoch"] for r in records]
        if listed is None or listed == mine:
            return
        self.history(records, chance)
        if not records:
            (self.out / "curve.png").unlink(missing_ok=True)
        self.warn(f"history.json listed epoch(s) {', '.join(map(str, listed))}, {source} holds "
                  f"{', '.join(map(str, mine)) or 'none'}: rewritten to the checkpoint's, the others are trained again")

    def _abandon(self) -> None:
        """Drop the JSON log after a failed write: its unwritten buffer would fail every later
        write and the final flush again, and one failure is all there is to say."""
        try:
            self._jsonl.close()
        except OSError:
            pass
        self._jsonl = None

    def close(self) -> None:
        for name in list(self._extra):
            self._close_extra(name)
        with self._lock:
            if self._jsonl is not None:
                try:
                    self._jsonl.close()
                except OSError as exc:
                    self._failure = self._failure or _failed(exc, self.jsonl_path, 0)
                self._jsonl = None
        self._raise_failure()


def _discard(tmp: Path) -> None:
    """Remove the temporary file of a write that failed, if it can be: on a file system gone
    read-only the removal fails too (EROFS even for a file never created), and that second error
    replaced the first, the one the user is told (a traceback instead of the exit-4 line)."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def _failed(exc: OSError, path: Path, needed: int) -> ServiceError:
    """Exit 4, said as a failed checkpoint write is: the same owner of the message."""
    return ServiceError(EXIT_CHECKPOINT, f"writing {path} failed: {write_failure(exc, path, needed)}")
