"""What a checkpoint's name is not trusted for: that it is a regular file (``not_a_file``, by
``os.stat`` before any open: a FIFO's open() blocks for ever), that it can be read
(``cannot_read``: a sound file is never set aside for that) and that it is this run directory's
run (``other_run``).  Each is a refusal (exit 2) naming the file and what to do.  (A stored step
that is not the name's: ``service.checkpoint.wrong_step``, which knows the names.)"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from service import run_ids
from service.errors import EXIT_CONFIG, ServiceError


def cannot_read(path: Path, exc: OSError) -> ServiceError:
    """Exit 2 for a checkpoint that could not be opened or read.  It may well be sound: renaming it
    ``*.corrupt`` and resuming an older one would silently throw its progress away."""
    return ServiceError(EXIT_CONFIG, f"checkpoint {path} cannot be read ({exc.strerror or exc}) by uid {os.getuid()}; "
                        "nothing was changed and no older checkpoint is used instead. Make it readable for that user "
                        "(or repair the disk) and run the same command again")


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(mode: int, other: str = "not a file") -> str:
    """What a file that is no regular one is, from its ``os.stat`` mode ("a FIFO (named pipe)")."""
    return next((name for test, name in _KINDS if test(mode)), other)


def not_a_file(path: Path) -> ServiceError | None:
    """Exit 2 for a checkpoint name that is no regular file (through a symbolic link too), seen by
    ``os.stat`` before any open: open() of a FIFO blocks until a writer comes (the start hung, deaf
    to SIGTERM).  None is damage to set aside: someone put it there.  (Only a process ignoring the
    run directory's lock could swap the file between this stat and the open.)"""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if not path.is_symlink():
            return None  # gone since it was listed: nothing to refuse
        return ServiceError(EXIT_CONFIG, f"checkpoint {path} is a symbolic link to {os.readlink(path)}, which does "
                            "not exist; nothing was changed. Restore that file or remove the link, and run the "
                            "same command again")
    except OSError as exc:  # EACCES on a directory on the way, ELOOP...
        return cannot_read(path, exc)
    if stat.S_ISREG(mode):
        return None
    kind = file_kind(mode)
    return ServiceError(EXIT_CONFIG, f"checkpoint {path} is {kind}, not a regular file; it was not opened and nothing "
                        f"was changed. Remove it or move it out of {path.parent} and run the same command again")


def other_run(path: Path, payload: dict[str, Any], last_start: dict[str, Any] | None) -> ServiceError | None:
    """Exit 2 for a checkpoint of another run than the run directory's (``last_start``: the
    ``start`` event its log ends with), same recipe and shards or not.  Resuming it replaced this
    directory's history and curve with the other run's and pruned this run's own checkpoints, said
    only by the run id in "resuming run".  Refused rather than warned of, as a checkpoint of another
    recipe is: a warning scrolls past in a service's log while the loss is irreversible, and a run
    is resumed on purpose elsewhere by copying its checkpoint into a directory of its own.  A copy
    of the whole directory, and the copy's restarts on the original's checkpoint, are this
    directory's run under an id of its own (``service.run_ids``)."""
    if run_ids.continued(path.parent, payload, last_start) is not None:
        return None
    theirs, ours = payload["run_id"], last_start["run_id"]
    return ServiceError(EXIT_CONFIG, f"checkpoint {path} is of run {theirs}, but this run directory's run is {ours} "
                        f"(its log.jsonl); copied or linked here? Nothing was changed. Remove it to resume {ours}, or "
                        f"resume {theirs} in a directory of its own (--out), and run again")
