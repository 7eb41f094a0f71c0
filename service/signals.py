"""SIGTERM/SIGINT/SIGHUP: the first one asks the loop to stop; one that comes again later ends the
process at once.

torchrun and Docker send SIGTERM and SIGKILL 30 s later (SPEC 8); Ctrl-C is SIGINT; a closed
terminal or ssh session is SIGHUP, whose default action would kill the process on the spot and
lose up to ``checkpoint.every_seconds`` of work, so it is a stop request like the other two.
Unless it is ignored when the service starts: ``nohup`` ignores it so that the run outlives the
terminal, and it stays ignored.  SIGINT is handled even when ignored: a shell starts a
background job (``&``, as ``docker/entrypoint.sh`` does) with SIGINT ignored, and the
entrypoint's trap forwards Ctrl-C to the service as SIGINT.

The handler only records the signal in plain attributes: no I/O, no locks, nothing that could
deadlock against the code it interrupted.  (A ``threading.Event`` takes its condition's lock
in ``set()``: a signal landing while the main thread was itself inside ``set()`` deadlocked the
handler against its own thread until SIGKILL.)  The loop polls ``requested`` after every step
(and every evaluation batch), finishes the step, writes a checkpoint and returns; the process
then exits 0.

One stop often arrives twice: a signal to a process group reaches the service and its parent,
and the parent passes it on (GNU make sends SIGTERM to its recipe, as do shells and inits that
forward signals to a child in their own group; torchrun starts its ranks in sessions of their own,
so they get only its copy).  Ending the process on that copy lost the checkpoint the first one
asked for (``make train-local`` under a group SIGTERM, 2 runs in 3 here).  So a signal within
``DUPLICATE_SECONDS`` of the first is the same request; one after that means "now": the process
exits at once with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as the shell
reports a process the signal killed.  That second signal is seen by a watcher thread, through
the wakeup file descriptor Python's C-level handler writes every signal's number to, so it works
even while the main thread is inside a long C call (a convolution, a DALI wait) where the
Python-level handler cannot run yet.

While there is nothing to save (``nothing_to_save``: a rank waiting in ``init_process_group`` for
ranks that may never come) the first stop signal ends the process at once, exit 0, with one line:
the main thread is blocked in C++ there and would read the request only once every rank has
joined, so torchrun (its peer died) or ``docker stop`` (its peers never came) SIGKILLed it 30 s
later with no line.  Exit 0, and nothing written to ``ALEXNET_EXIT_FILE``: a stop with no trainer
yet, as ``docker/entrypoint.sh`` ends one, and a peer's diagnosed code stays the job's.

Under torchrun the first stop signal is also told to the other ranks (``tell``:
``service.rank_stops``), and a rank that is told ends the same way while it has nothing to save, or
takes it as a stop request otherwise (``peer_stopped``): torchrun counts an exit 0 as a rank that
succeeded and waits for the rest, which waited for the stopped rank in ``init_process_group``; and
a rank waiting in a collective (rank 0's shard check before training) could not hear of it.

Once the run has ended, ``uninstall(ending=True)`` leaves the stop signals ignored rather than at
their default action: the process still takes a second or more to exit (the interpreter's and
torch's teardown), and a SIGTERM then killed a finished, saved run (exit -15, read as killed).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

from common import parent_death

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
DUPLICATE_SECONDS = 1.0  # a copy forwarded by a parent arrives within milliseconds
_EARLY: list[tuple[int, float]] = []  # (signal, when) before ``StopFlag.install`` (``catch_early``)


def catch_early() -> None:
    """From the first lines of ``python -m service``, before its imports (torch, DALI: seconds): a
    stop signal is remembered for ``StopFlag.install``, which honours it (nothing to save yet: the
    process ends, exit 0, with its line, and tells the other ranks).  Its default action killed the
    process: under torchrun a failed rank, torchrun's ChildFailedError traceback and exit 1 (a crash
    to ``docker/entrypoint.sh``), the peers told nothing.  A second one a second or more later ends
    the process at once, as after ``install``."""
    for sig in SIGNALS:
        if not (sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN):  # nohup's: see install
            signal.signal(sig, _remember)


def _remember(signum: int, frame: object) -> None:
    now = time.monotonic()
    if _EARLY and now - _EARLY[0][1] >= DUPLICATE_SECONDS:
        os.write(2, f"{signal.Signals(signum).name} again during the service's start: exiting now\n".encode())
        os._exit(128 + signum)
    _EARLY.append((signum, now))


class StopFlag:
    """Set by the first SIGTERM/SIGINT/SIGHUP (or by :meth:`request`); read by the loop.

    Plain attributes only: a bool and a str are stored atomically under the GIL, and the
    handler runs in the main thread between bytecodes, so reading them needs no lock.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._by_signal = False
        self._wakeup: tuple[int, int] | None = None  # (write end of the watcher's pipe, the previous wakeup fd)
        self._previous: dict = {}  # the handlers install() replaced, for uninstall()
        self.idle_line: str | None = None  # set while there is nothing to save (``nothing_to_save``)
        self.tell: Callable[[str], object] | None = None  # gets the first stop signal's name (the other ranks)

    def request(self, reason: str) -> None:
        """Ask for a stop from code (the same path as a signal)."""
        self.signal_name = self.signal_name or reason
        self.requested = True

    def install(self) -> StopFlag:
        """Handle SIGTERM, SIGINT and SIGHUP (unless ignored: ``nohup``) in this (main) thread; start the watcher."""
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._wakeup = (write, signal.set_wakeup_fd(write, warn_on_full_buffer=False))
        threading.Thread(target=_watch, args=(read, self), name="stop-signal-watcher", daemon=True).start()
        for sig in SIGNALS:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # nohup's: the run is to outlive its terminal (see the module docstring)
            self._previous[sig] = signal.signal(sig, self._handle)
        if _EARLY:  # during the imports (``catch_early``)
            self._handle(_EARLY[0][0], None)
            _EARLY.clear()
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if not self._by_signal:  # a repeat (within DUPLICATE_SECONDS, else the watcher exits) changes nothing
            self._by_signal = True
            self.signal_name = signal.Signals(signum).name
        self.requested = True

    @contextlib.contextmanager
    def nothing_to_save(self, line: str) -> Iterator[None]:
        """Inside: a stop signal (or one already requested) ends the process at once, exit 0, with
        ``line`` (``{signal}``: the signal's name) on stderr (see the module docstring)."""
        if self.requested:
            if self._by_signal and self.tell is not None:  # perhaps before ``tell`` was set: again
                self.tell(self.signal_name)
            _leave(line, self.signal_name or "stop")
        self.idle_line = line
        try:
            yield
        finally:
            self.idle_line = None

    def peer_stopped(self, name: str) -> None:
        """Another rank was stopped (``name``: "rank 0's SIGTERM"): while there is nothing to save
        this process ends too, exit 0, its line saying ``name``; else a stop request, as a signal's."""
        if (line := self.idle_line) is not None:
            _leave(line, name)
        self.request(name)

    def uninstall(self, ending: bool = False) -> None:
        """Back to the handlers there were before (tests and benchmarks that run the loop
        in-process: pytest's Ctrl-C, a SIGHUP that ``nohup`` ignores).  ``ending``: the process
        ends with the run (``python -m service``): the stop signals are ignored instead, so one
        during the exit leaves the finished run's exit code alone."""
        if self._wakeup is None:
            return
        write, previous = self._wakeup
        for sig, handler in self._previous.items():  # None: not set from Python; the default then
            signal.signal(sig, signal.SIG_IGN if ending else signal.SIG_DFL if handler is None else handler)
        signal.set_wakeup_fd(previous)
        os.close(write)  # the watcher reads the end of its pipe and returns
        self._wakeup = None


def follow_launcher(flag: StopFlag, parent: int, env: dict[str, str] | None = None) -> None:
    """Under torchrun: a SIGTERM to this rank when torchrun's agent ends, however it ends.

    torchrun starts each rank in a session of its own, and its agent stops them only when it
    lives to do so: after a ``kill -9`` of torchrun (or its crash) the ranks trained on as
    orphans, holding their GPUs and the run directory's locks (the next start: "in use by another
    service").  The kernel's parent-death signal (``prctl(PR_SET_PDEATHSIG)``; the agent starts
    its ranks from its main thread, so it comes when the agent's process ends) makes that a
    SIGTERM to every rank: they agree on a step and rank 0 writes a checkpoint, as for a SIGTERM
    to torchrun.  ``parent``: this process's parent when it started (``service.PARENT``); one
    already gone before the kernel was asked is a stop requested now."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env:
        return
    if not parent_death.ask_for_signal(signal.SIGTERM):
        return  # not Linux: torchrun's own behaviour
    if os.getppid() != parent:
        flag.request("torchrun ended")


def _leave(line: str, name: str) -> None:
    """End the process now, exit 0, saying ``line``: nothing to save, nothing to clean up that
    the kernel does not (the run directory's lock is a ``flock``)."""
    os.write(2, f"service: {line.format(signal=name)}\n".encode())
    os._exit(0)


def _watch(read: int, flag: StopFlag) -> None:
    """Every signal's number as Python's C handler writes it; exit on a stop signal that comes
    ``DUPLICATE_SECONDS`` or more after the first, or on the first while ``flag`` has nothing to save;
    the first is told (``flag.tell``) before anything else."""
    first, numbers = None, {int(s) for s in SIGNALS}
    with os.fdopen(read, "rb", buffering=0) as pipe:
        while chunk := pipe.read(64):
            now = time.monotonic()
            for signum in (n for n in chunk if n in numbers):
                if first is None and flag.tell is not None:
                    flag.tell(signal.Signals(signum).name)
                if (line := flag.idle_line) is not None:
                    _leave(line, signal.Signals(signum).name)
                if first is None:
                    first = now
                elif now - first >= DUPLICATE_SECONDS:
                    name = signal.Signals(signum).name
                    os.write(2, f"{name} again {now - first:.1f} s after the first stop signal: exiting now, "
                                f"without the checkpoint the first one asked for\n".encode())
                    os._exit(128 + signum)
