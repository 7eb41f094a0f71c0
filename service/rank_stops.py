"""A stop of one rank that reaches every other rank, joined or not: a note in torchrun's store.

A rank stopped while it waits in ``init_process_group`` has nothing to save and ends at once
(``StopFlag.nothing_to_save``), exit 0.  Its peers used to learn nothing of it: torchrun counts an
exit 0 as a rank that succeeded and waits for the others, and one that came later (a slow node, slow
imports) either read the stopped rank's address and died of gloo's "connectFullMesh failed ...
Connection refused" (a traceback, torchrun's exit 1: a crash to ``docker/entrypoint.sh``, or its
data-error code once stopping) or, when the stopped rank had not published it yet, waited for the
stopped rank in ``init_process_group`` until gloo's 30-minute timeout.

The ranks cannot tell each other through gloo before they have joined, but every rank of a torchrun
job reaches torchrun's agent store (the rendezvous's TCP store, up before any rank starts and for
the whole job): the stopped rank writes a note there before it exits, each rank's thread looks for
one every ``POLL_SECONDS`` from before it joins, and one that finds it ends at once too, exit 0,
with a line naming the rank that was stopped and its signal.  A rank that starts after the note
finds it at its first look.

Once joined, the loop's per-step agreement tells every rank of any rank's stop, but only once
training runs: a rank stopped while it waited in a collective for a busy peer (rank 0 hashing every
shard before training, ``data.verify before``: minutes on ImageNet) was heard of only after the
check and the loaders' build, and the job stopped then with a step-0 checkpoint.  So the first stop
signal of every rank is noted, whenever it comes, and a rank that finds the note takes it as a stop
request of its own (the shard check ends within a block of its hash).

Keys of this restart attempt's own (``service.dist.attempt_store``):
a stop ends the job, so no later attempt reads it.  Without torchrun's store (``env://`` started
by hand) nothing is noted, as before.
"""
from __future__ import annotations

import datetime
import threading
from collections.abc import Callable

from service.dist import Ranks, attempt_store

KEY = "alexnet_stopped"
POLL_SECONDS = 0.2
POST_SECONDS = 2.0
STORE_TIMEOUT = datetime.timedelta(seconds=10)  # a live store answers in milliseconds


class RankStops:
    """This rank's view of the job's stop note: ``post`` one, ``on_note`` called with another
    rank's (from a thread of its own) until ``close``."""

    def __init__(self, ranks: Ranks, on_note: Callable[[str], object]) -> None:
        self.ranks = ranks
        self._store = attempt_store(timeout=STORE_TIMEOUT) if ranks.distributed else None
        self._lock = threading.Lock()  # the poll and a post come from two threads, on one connection
        self._closed = threading.Event()
        if self._store is not None:
            threading.Thread(target=self._watch, args=(on_note,), name="rank-stop-notes", daemon=True).start()

    def post(self, signal_name: str) -> None:
        """Tell every rank that this one was stopped by ``signal_name``.  Best effort, for at most
        ``POST_SECONDS``: the process may be about to end, and a store that does not answer means
        torchrun's agent is gone (its ranks get their parent-death SIGTERM)."""
        if self._store is not None:
            note = f"rank {self.ranks.rank}'s {signal_name}"
            writer = threading.Thread(target=self._set, args=(note,), name="rank-stop-post", daemon=True)
            writer.start()
            writer.join(POST_SECONDS)

    def _set(self, note: str) -> None:
        try:
            with self._lock:
                self._store.set(KEY, note)
        except (RuntimeError, OSError):
            pass

    def _watch(self, on_note: Callable[[str], object]) -> None:
        """Look for another rank's note until ``close``; hand it to ``on_note`` once."""
        while not self._closed.is_set():
            try:
                with self._lock:
                    note = self._store.get(KEY).decode() if self._store.check([KEY]) else None
            except (RuntimeError, OSError):
                return  # the store is gone: torchrun's agent ended, and ends or ended this rank
            if note is not None and not note.startswith(f"rank {self.ranks.rank}'s "):
                on_note(note)
                return
            self._closed.wait(POLL_SECONDS)

    def close(self) -> None:
        """Stop looking (the process's end closes the connection)."""
        self._closed.set()
