"""The output directory of one run: claimed for this run alone.

Why a lock: two sharders writing into one ``--out`` (a re-run started while a ``nohup`` run
is still going, ``make demo`` in two terminals) each begin by removing the files their own
journal does not list, which are the other's temp files and freshly published shards: both
ended in a ``FileNotFoundError`` traceback, with their journal lines interleaved.  The second
run now stops at once with one line, before it touches anything.

Why ``--out`` must not be a tree the run reads: with ``--out`` = ``--src`` (or inside its
``train/``), the shards land among the images, and every re-run counted its own tars and
indexes as skipped inputs ("not in a class directory") and rebuilt everything.  An ``--out``
that is a file ended in a ``FileExistsError`` traceback.
"""
from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK = ".sharding.lock"


class OutDirError(RuntimeError):
    """``--out`` cannot be written by this run; ``str()`` says why and what to do."""


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def check_apart(out: Path, trees: list[str]) -> None:
    """Refuse an ``out`` that is not a directory, or whose split folders lie in a tree read for images."""
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out} is a file, not a directory: choose another --out (make: OUT=dir)")
    for split in ("train", "val"):
        target = os.path.join(os.path.realpath(out), split)
        for tree in trees:
            if _inside(target, os.path.realpath(tree)):
                raise OutDirError(f"--out {out} would write its {split}/ shards inside {tree}, which this run reads "
                                  "images from (each re-run would count the shards as inputs): choose an --out "
                                  "outside --src's image folders (make: OUT=dir)")


@contextmanager
def claimed(out: Path, trees: list[str]) -> Iterator[None]:
    """Check ``out`` (``check_apart``), create it and hold its lock (released when this process
    and its workers are gone).  The lock file stays, empty: a finished directory's bytes do not
    depend on which run wrote it."""
    check_apart(out, trees)
    out.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        yield  # a finished directory on a read-only mount: no run can write there, re-verifying it needs no lock
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutDirError(f"another sharder is writing to {out} (it holds {out / LOCK}); wait for it to end "
                              "or stop it (two runs into one directory remove each other's shards), then re-run") from None
        yield
    finally:
        os.close(fd)
