"""``python -m service.launch``: torchrun (``torch.distributed.run``, the same arguments) ending as
the service does, for ``make train-local NPROC=2`` and anyone starting ranks by hand.

Why not torchrun itself: it reports how its ranks ended in its own words, over theirs.
- A stop (Ctrl-C: SIGINT to the terminal's foreground group, or SIGTERM): its agent passes the
  signal to the ranks, which agree on a step, checkpoint and exit 0, and then it logged "Received 2
  death signal" and "Sending process N closing signal" warnings, raised ``SignalException: Process N
  got signal: 2`` with a traceback and exited 1 (make added ``*** [...] Error 1``).  Here the
  ranks' ``stopped (SIGINT) at step ...`` line is the last word, and the launcher ends by the
  signal itself (a shell says 130 or 143; make ends as it does over one process).
- A rank's diagnosed error (a taken port: 3, a bad setting: 2; ``service.errors``): the rank's
  one line, then torchrun's ``ChildFailedError`` report and exit 1 whatever the code.  Here: the
  first failed rank's own exit code, no report.  A rank that crashed wrote its own traceback above.

``docker/entrypoint.sh`` starts ranks through this launcher too (NPROC above 1), but passes a stop
to the ranks, not to the launcher, and reads the diagnosed code from ``ALEXNET_EXIT_FILE``.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

# What torchrun's agent logs while it passes a stop on, and of a rank that exited with a code (its
# own line or traceback says why): the ranks' words.  A rank a signal killed (exitcode -9: the OOM
# killer) said nothing, and torchrun's line about it stays.
CHATTER = re.compile(r"death signal, shutting down workers|closing signal|failed \(exitcode: [1-9]")


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not CHATTER.search(record.getMessage())


def main(argv: list[str]) -> int:
    # torchrun sets it to 1 for several ranks when unset, in a banner of W lines: the same, quietly
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name in ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).addFilter(_Quiet())
    try:
        torchrun(argv)
    except SignalException as exc:  # the ranks were told and waited for (up to the agent's timeout)
        _die_of(signal.Signals(exc.sigval))
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
    return 0


def _die_of(sig: signal.Signals) -> None:
    """End by ``sig`` itself, so that a parent sees what stopped it (make then ends quietly, as it
    does when one process stops; an exit code of 130 made it print ``*** [...] Error 130``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    sys.exit(128 + sig.value)  # not reached for a signal whose default action ends the process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
