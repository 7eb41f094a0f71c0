"""Whether the last start in this run directory ended without a word, and what the next one does.

A service that ends by itself, however it ends (finished, stopped, a diagnosed error, a Python
traceback), says so.  One that is killed (``kill -9``, the kernel's OOM killer) or crashes in
native code says nothing: a segfault printed no line and exited 139.  One such crash is a damaged
image: a JPEG whose header bytes are garbled can make DALI's decoder fail and then crash the
process (seen on the CPU with one such shard, ``--epochs 1``: exit 139 in 1 of 2 runs, the other
run's loader error diagnosed the shard).  With ``data.verify background`` (the default) training
starts before the shard check reaches that shard, so every restart (``docker/entrypoint.sh``'s)
crashed the same way, the check never getting there.

So each rank marks its run directory for the time it runs (``.running-rank<r>``: its pid, host
and start time) and removes the mark on its way out, whatever the way, in Python.  A mark found at
start is a start that ended without a word: this start says so and checks every shard before
training (as ``data.verify before``; the shards an earlier check passed are remembered in
``shard-checks.json`` and not hashed again), so a damaged shard is named before DALI reads it.
The ranks agree: any rank's mark makes every rank's check come first (the check before training
is a step they take together).  ``faulthandler`` (``service.__main__``) prints the threads' stacks
of such a crash, for the bug report.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from service.dist import Ranks
from service.runlog import RunLog


class UncleanEnd:
    """This rank's mark in the run directory, and whether any rank's last start left one."""

    def __init__(self, out: Path, ranks: Ranks, log: RunLog) -> None:
        """Read the marks of the last start (every rank's verdict, gathered), then mark this one."""
        self.path = out / f".running-rank{ranks.rank}"
        try:
            previous = self.path.read_text(errors="replace").strip() or "no details"
        except FileNotFoundError:
            previous = None
        except OSError as exc:  # there, but not readable: a mark all the same
            previous = f"unreadable: {exc.strerror or exc}"
        found = [(rank, text) for rank, text in enumerate(ranks.gather(previous)) if text is not None]
        self.found = bool(found)
        if found:
            rank, text = found[0]
            who = f"rank {rank}'s" if ranks.distributed else "the"
            if ranks.is_main:  # one voice: every rank knows the same
                log.warn(f"service: {who} last start in {out} ({text}) did not end in Python: killed (kill -9, the OOM "
                         "killer, a second stop signal) or crashed in native code, as a damaged image can make "
                         "DALI's decoder do; this start checks every shard before training (data.verify before)")
            log.event("unclean_end", ranks=[r for r, _ in found], previous=text)
        try:
            self.path.write_text(f"pid {os.getpid()} on {socket.gethostname()}, started "
                                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        except OSError as exc:  # the run directory was checked writable; a full disk
            log.warn(f"service: cannot mark {self.path} ({exc.strerror or exc}): a crash of this start would not "
                     "make the next one check the shards first")

    def clear(self) -> None:
        """This start ends in Python, saying how: no mark."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
