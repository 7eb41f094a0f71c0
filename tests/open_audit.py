"""``python -m tests.open_audit LOG DIR -m MODULE ARGS...``: run ``python -m MODULE ARGS`` with an
audit hook (``sys.addaudithook``) that appends each file opened under ``DIR`` to ``LOG``, one JSON
line ``{"path", "thread", "rank"}`` per open.

Why: which files a real start reads, and how often, counted where Python itself opens them (no
mock of the files, no strace).  A launcher like ``torchrun`` (``tests.service_proc.Service``'s
``launcher``): under ``torchrun ... -m tests.open_audit LOG DIR -m service`` every rank appends to
the same ``LOG`` (one write per line on an O_APPEND file: lines of two ranks do not interleave).
Opens in C++ (DALI's reader) raise no audit event and are not seen."""
from __future__ import annotations

import json
import os
import runpy
import sys
import threading


def main(argv: list[str]) -> None:
    log, under, dash_m, module, *args = argv
    if dash_m != "-m":
        raise SystemExit("usage: python -m tests.open_audit LOG DIR -m MODULE ARGS...")
    under = os.path.realpath(under) + os.sep
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # before the hook: its own open is not seen
    rank = os.environ.get("RANK", "0")

    def hook(event: str, event_args: tuple) -> None:
        if event != "open" or not isinstance(event_args[0], (str, bytes, os.PathLike)):
            return  # an open of a file descriptor
        path = os.path.realpath(os.fsdecode(event_args[0]))
        if path.startswith(under):
            line = {"path": path, "thread": threading.current_thread().name, "rank": int(rank)}
            os.write(fd, (json.dumps(line) + "\n").encode())

    sys.addaudithook(hook)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
