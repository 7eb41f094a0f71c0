"""The run directory's own files: checked writable before anything slow, and cleared by
``--fresh true`` (the lock that keeps one service per directory: ``service.rundir_lock``)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from common.config_values import file_in_the_way
from service import checkpoint
from service.errors import EXIT_RUNDIR, ServiceError
from service.runlog import RunLog

# What --fresh true deletes in the run directory (the service's own files, nothing else).
RUN_FILES = (*checkpoint.GLOBS, "log*.jsonl", "ids*.jsonl", "history.json", "curve.png", "config.json")


def check_run_dir(out: Path) -> bool:
    """Create the run directory and write a file in it, or fail in one line (exit 5); returns
    whether this call created it.

    Before anything slow: otherwise a read-only or foreign directory surfaces as an OSError
    traceback from the first log write, after the port, the shards and the loaders.
    """
    created = not out.exists()
    file = file_in_the_way(out)
    if file is not None:
        raise ServiceError(EXIT_RUNDIR, f"run directory {out}: {file} is a file, not a directory: choose another "
                                        "directory with --out (a new one is created), or move the file away")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ServiceError(EXIT_RUNDIR, f"run directory {out} cannot be written ({exc.strerror or exc}) by uid "
                                        f"{os.getuid()}: make it writable for that user, or choose another "
                                        "directory with --out") from None
    return created


def clear_run(log: RunLog) -> None:
    """``--fresh true``: delete the run directory's checkpoints and logs."""
    removed = [p for pattern in RUN_FILES for p in log.out.glob(pattern)]
    for p in removed:
        p.unlink(missing_ok=True)
    log.say(f"fresh start: deleted {len(removed)} file(s) of the previous run in {log.out}")
