"""Progress reports that suit where they are written: the one owner of that policy.

On a terminal, a tqdm bar redrawn in place.  Anywhere else (``make shards > log 2>&1``, ``docker
logs``, CI) a tqdm bar is a stream of carriage-return redraws, ten a second, that a log file
keeps as one ever-growing line; there it is a plain line every ``every_seconds`` (default 30 s)
and a last one at the end.  Every progress report in the project goes through ``progress``.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LOG_SECONDS = 30.0


class LineProgress:
    """The part of tqdm's interface the project uses (``update``, ``close``, ``with``), as lines."""

    def __init__(self, total: int, desc: str, unit: str, initial: int, file: TextIO, every_seconds: float) -> None:
        self.total, self.desc, self.unit, self.n, self.file = total, desc, unit, initial, file
        self.every_seconds = every_seconds
        self._initial, self._start = initial, time.monotonic()
        self._last = self._start
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_seconds:
            self._last = now
            self._write(now)

    def _write(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = (self.n - self._initial) / elapsed
        done = f"{self.n}/{self.total} {self.unit} ({self.n / max(self.total, 1):.0%})"
        line = f"{self.desc}: {done}, {rate:.1f} {self.unit}/s"
        if final:
            line += f", {elapsed:.0f} s"
        elif rate > 0:
            line += f", ETA {(self.total - self.n) / rate:.0f} s"
        # One write: print's two (text, then newline) let a stop signal's KeyboardInterrupt land
        # between them, and the stop's own line was glued to this one (seen in tests/test_shards_signals.py)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._write(time.monotonic(), final=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str, unit: str = "img", initial: int = 0, file: TextIO | None = None,
             every_seconds: float = LOG_SECONDS, **bar_args) -> tqdm | LineProgress:
    """A tqdm bar when ``file`` (default stderr, as tqdm) is a terminal, else a ``LineProgress``."""
    file = file or sys.stderr
    if file.isatty():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=file, **bar_args)
    return LineProgress(total, desc, unit, initial, file, every_seconds)
