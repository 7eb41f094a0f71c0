"""One service per run directory.

Two services given the same ``--out`` both trained, each overwriting the other's checkpoints, and
the second one's start deleted the first one's checkpoint in flight as a stale temporary file.
So each process holds ``fcntl.flock`` on ``<out>/.lock-rank<r>`` (r: its global rank) for its
whole life.  The ranks of one torchrun job lock different files and share the directory; a
second job, or a lone service (rank 0), finds its rank's file held and refuses in one line before
it joins any process group, so it fails rather than waiting for peers that never come.

The kernel drops the lock when its process ends, however it ends (``kill -9``, a crash, the OOM
killer): a restart after a crash is never blocked and there is no stale lock to clean up.  The
file is left in place (deleting it would race with a process locking it) and holds the holder's
PID and host, for the message; ``--fresh`` does not touch it.  Only a start that refused in a
directory it created removes it (``close``).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from service.errors import EXIT_RUNDIR, ServiceError


class RunDirLock:
    """This process's claim on its run directory; ``close`` (or the process's end) releases it."""

    def __init__(self, out: Path, rank: int) -> None:
        """Take the lock, or raise ``ServiceError`` (exit 5) naming the directory and its holder."""
        self.path = out / f".lock-rank{rank}"
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ServiceError(EXIT_RUNDIR, f"run directory {out}: cannot create its lock file {self.path.name} "
                                            f"({exc.strerror or exc}): make the directory writable for uid "
                                            f"{os.getuid()}, or choose another one with --out") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            self.close()
            raise ServiceError(EXIT_RUNDIR, f"run directory {out} is in use by another service{holder}: two runs in "
                                            "one directory overwrite each other's checkpoints. Stop that one first, "
                                            "or choose another directory with --out") from None
        try:  # for the message a second service prints; the lock holds without it (a full disk)
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass

    def _holder(self) -> str:
        """`` (pid N on HOST, rank r)`` as the holder wrote it; empty if it has not yet."""
        try:
            written = os.pread(self._fd, 200, 0).decode(errors="replace").strip()
        except OSError:
            written = ""
        rank = self.path.name.removeprefix(".lock-rank")
        return f" ({written}, rank {rank})" if written else f" (rank {rank})"

    def close(self, created: bool = False) -> None:
        """Release the lock.  ``created``: this start created the run directory; when the lock files
        are all it holds (the start refused: a taken port, a peer that failed), they and the
        directory are removed, so a refused start leaves nothing behind.  The file is removed while
        still locked: a second service that opened it meanwhile is refused, not let in."""
        if self._fd is None:
            return
        out = self.path.parent
        if created and all(p.name.startswith(".lock-rank") for p in out.iterdir()):
            with contextlib.suppress(OSError):
                self.path.unlink()
                out.rmdir()  # fails while another rank's lock file is still there: its close removes it
        os.close(self._fd)  # releases the lock
        self._fd = None
