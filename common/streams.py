"""An output stream whose reader went away (``| head`` closed the pipe, a terminal was closed).

The commands end as a SIGPIPE would have ended them, silently, rather than in a BrokenPipeError
traceback; the stream is pointed at /dev/null first, so neither the unwritten buffer nor the
interpreter's last flush fails again.
"""
from __future__ import annotations

import os
import signal

READER_GONE = 128 + signal.SIGPIPE  # the exit code of a death by SIGPIPE, as a shell reports it (141)


def silence(fd: int) -> None:
    """Point file descriptor ``fd`` at /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
