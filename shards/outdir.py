"""The output directory of one run: claimed for this run alone.

Why a lock: two sharders writing into one ``--out`` (a re-run started while a ``nohup`` run
is still going, ``make demo`` in two terminals) each begin by removing the files their own
journal does not list, which are the other's temp files and freshly published shards: both
ended in a ``FileNotFoundError`` traceback, with their journal lines interleaved.  The second
run now stops at once with one line, before it touches anything.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK = ".sharding.lock"


class OutDirError(RuntimeError):
    """``--out`` cannot be written by this run; ``str()`` says why and what to do."""


@contextmanager
def claimed(out: Path) -> Iterator[None]:
    """Create ``out`` and hold its lock (released when this process and its workers are gone).
    The lock file stays, empty: a finished directory's bytes do not depend on which run wrote it."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutDirError(f"another sharder is writing to {out} (it holds {out / LOCK}); wait for it to end "
                              "or stop it (two runs into one directory remove each other's shards), then re-run") from None
        yield
    finally:
        os.close(fd)
