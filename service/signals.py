"""SIGTERM/SIGINT/SIGHUP: the first one asks the loop to stop, a second one ends the process at once.

torchrun and Docker send SIGTERM and SIGKILL 30 s later (SPEC 8); Ctrl-C is SIGINT; a closed
terminal or ssh session is SIGHUP, whose default action would kill the process on the spot and
lose up to ``checkpoint.every_seconds`` of work, so it is a stop request like the other two.

The handler only records the signal in plain attributes: no I/O, no locks, nothing that could
deadlock against the code it interrupted.  (A ``threading.Event`` takes its condition's lock
in ``set()``: a signal landing while the main thread was itself inside ``set()`` deadlocked the
handler against its own thread until SIGKILL.)  The loop polls ``requested`` after every step
(and every evaluation batch), finishes the step, writes a checkpoint and returns; the process
then exits 0.

The handler also puts the signals back to the operating system's default action, so a second
signal terminates the process immediately, even while the main thread is inside a long C call
(a convolution, a DALI wait) where a Python handler could not run yet.
"""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopFlag:
    """Set by the first SIGTERM/SIGINT/SIGHUP (or by :meth:`request`); read by the loop.

    Plain attributes only: a bool and a str are stored atomically under the GIL, and the
    handler runs in the main thread between bytecodes, so reading them needs no lock.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._installed = False

    def request(self, reason: str) -> None:
        """Ask for a stop from code (the same path as a signal)."""
        self.signal_name = self.signal_name or reason
        self.requested = True

    def install(self) -> StopFlag:
        """Handle SIGTERM, SIGINT and SIGHUP in this (main) thread."""
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        self._installed = True
        return self

    def _handle(self, signum: int, frame: object) -> None:
        for sig in SIGNALS:  # the next one is the OS default: terminate now
            signal.signal(sig, signal.SIG_DFL)
        self.signal_name = signal.Signals(signum).name
        self.requested = True

    def uninstall(self) -> None:
        """Back to Python's defaults (tests and benchmarks that run the loop in-process)."""
        if self._installed:
            for sig in SIGNALS:
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
            self._installed = False
