"""SIGTERM/SIGINT: the first one asks the loop to stop, a second one ends the process at once.

torchrun and Docker send SIGTERM and SIGKILL 30 s later (SPEC 8).  The handler only records
the signal: no I/O, no locks, nothing that could deadlock against the code it interrupted.
The loop polls ``requested`` after every step (and every evaluation batch), finishes the step,
writes a checkpoint and returns; the process then exits 0.

The handler also puts both signals back to the operating system's default action, so a
second signal terminates the process immediately, even while the main thread is inside a
long C call (a convolution, a DALI wait) where a Python handler could not run yet.
"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """Set by the first SIGTERM/SIGINT (or by :meth:`request`); read by the loop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self._installed = False

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str) -> None:
        """Ask for a stop from code (the same path as a signal)."""
        self.signal_name = self.signal_name or reason
        self._event.set()

    def install(self) -> StopFlag:
        """Handle SIGTERM and SIGINT in this (main) thread."""
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        self._installed = True
        return self

    def _handle(self, signum: int, frame: object) -> None:
        for sig in SIGNALS:  # the next one is the OS default: terminate now
            signal.signal(sig, signal.SIG_DFL)
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def uninstall(self) -> None:
        """Back to Python's defaults (tests and benchmarks that run the loop in-process)."""
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._installed = False
