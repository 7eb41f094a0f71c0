"""How the service ends: exit codes, and the one exception type that carries a user-facing message.

Anything the user can fix (a setting, the shards, the port, the run directory) is raised as a
``ServiceError``; ``service.app.main`` prints its message as one line on stderr and exits with
its code, never with a traceback.  Process supervisors (Docker, torchrun, systemd) see:

    0  finished all epochs, or stopped by SIGTERM/SIGINT after writing a checkpoint (or, during
       the shard check before training, with nothing trained yet to checkpoint: ``StoppedAtStart``;
       or while waiting for the other ranks to join, not recorded: ``StopFlag.nothing_to_save``;
       also a rank told of that stop by the stopped rank: ``service.rank_stops``; or during its
       imports: ``service.signals.catch_early``)
    1  a data error: missing, truncated or undecodable shard (the message names it); also a rank
       of a torchrun job whose peer ended first (``PeerGone``: that rank's line and code say why)
    2  a setting is invalid, or does not match the run directory's checkpoints, or differs
       between the ranks of one job (``service.rank_settings``)
    3  the HTTP port cannot be served (in use, or not allowed)
    4  a checkpoint (or a log file) could not be written (disk full, permissions)
    5  the run directory cannot be created or written (read-only, not this user's), or another
       service runs in it (``service.rundir_lock``): checked at start, before anything slow, so it
       fails in a second rather than after building the loaders
    6  training diverged: a non-finite loss or weight (too high a learning rate); the run stops
       before checkpointing it, so the newest checkpoint is the last good state (service.divergence)
    143 / 130  SIGTERM / SIGINT again, a second or more after the first stop signal: immediate exit,
               no checkpoint (128 + the signal, as a shell reports a process the signal killed)

Codes 1-6 are problems a restart cannot fix (a diverged run resumed would diverge again).  A supervisor that restarts crashes
(docker/entrypoint.sh) must tell them from a crash, which torchrun hides (it exits 1 whatever its
ranks did): with ``ALEXNET_EXIT_FILE`` set, ``record_exit`` writes the code there as well.
"""
from __future__ import annotations

import os
import sys

EXIT_OK = 0
EXIT_DATA = 1
EXIT_CONFIG = 2
EXIT_PORT = 3
EXIT_CHECKPOINT = 4
EXIT_RUNDIR = 5
EXIT_DIVERGED = 6


def record_exit(code: int) -> None:
    """Write a diagnosed exit code to ``$ALEXNET_EXIT_FILE`` when set (best effort: never fails)."""
    path = os.environ.get("ALEXNET_EXIT_FILE")
    if path:
        try:
            with open(path, "w") as f:
                f.write(f"{code}\n")
        except OSError:
            pass


class ServiceError(Exception):
    """A failure with a message for the user and the exit code that goes with it."""

    recorded = True  # written to $ALEXNET_EXIT_FILE (``record_exit``)

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.said = False

    def say(self) -> None:
        """The user's line on stderr, once (``service.app.last_words`` says it before its wait)."""
        if not self.said:
            self.said = True
            sys.stderr.write(f"service: {self}\n")  # one write: the ranks of a torchrun job share stderr,
            sys.stderr.flush()  # and print's text and newline, two writes, interleaved their lines


class DataError(ServiceError):
    """A shard cannot be read or decoded."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_DATA, message)


class ConfigMismatch(ServiceError):
    """The run directory's checkpoint belongs to another recipe or other data."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_CONFIG, message)


class StoppedAtStart(ServiceError):
    """A stop request honoured before training began (the shard check of ``data.verify before``):
    not a failure, so exit 0, with the one line saying what was left undone."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_OK, message)


class Diverged(ServiceError):
    """The training loss or the weights stopped being finite numbers."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_DIVERGED, message)


class PeerGone(ServiceError):
    """Another rank of the job ended first, and this rank's next collective found it gone.  That
    rank's own line says why, and the code it recorded is the diagnosis: this one is exit 1 like
    any crash, and not recorded over it."""

    recorded = False

    def __init__(self, rank: int) -> None:
        super().__init__(EXIT_DATA, f"rank {rank}: stopped: another rank of this job ended first; its own line says why")
