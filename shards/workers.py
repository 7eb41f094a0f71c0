"""The sharder's worker processes: a bounded number of tasks in flight, and a clean stop.

Why not ``multiprocessing.Pool`` (issue 14): its workers kept the default SIGTERM action, so
a signal to the process group (``timeout``, ``kill -- -PGID``, systemd's stop) killed them
with tasks in flight and left the parent blocked in ``imap`` for good; and ``imap`` queued
every finished result in the parent however slowly the parent consumed them (8,034 results,
~160 MB, with the parent slowed).  Here:

- workers ignore SIGINT and SIGTERM: a signal to the group reaches them all, but only the
  parent acts on it.  It asks every worker to stop, waits ``GRACE`` seconds, then kills the
  rest, and returns only once every worker is gone: no stray processes, no hang.
- a task function calls ``checkpoint()`` between images: it reports progress and raises
  ``Stopped`` when the parent asks for a stop or is gone (end of file on the worker's pipe),
  so a stop takes effect within one image, and a worker never outlives its parent by more.
- at most ``window`` tasks are started and not yet consumed, so what waits in the parent is
  bounded by the number of workers, never by the dataset.  Results come back in task order.
- a worker that dies (the OOM killer, kill -9) is noticed at once through its sentinel.
"""
from __future__ import annotations

import gc
import signal
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from typing import Any

GRACE = 5.0  # seconds a worker gets to finish its current image and clean up after a stop
TICK = 0.25  # seconds between a worker's progress reports
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
    """Raised in a worker by ``checkpoint`` when its parent asked it to stop or is gone."""


class WorkerError(RuntimeError):
    """A task failed (an OSError such as a full disk: one line) or a worker died."""


_conn: Connection | None = None  # this worker's end of its pipe (None in the parent)
_ticks = 0
_last_tick = 0.0


def checkpoint(done: int = 1) -> None:
    """Count ``done`` more images for the progress bar; raise ``Stopped`` on a stop or orphaning."""
    global _ticks, _last_tick
    if _conn is None:
        return
    if _conn.poll():  # the only thing a parent sends to a busy worker is a stop; EOF: it is gone
        raise Stopped
    _ticks += done
    now = time.monotonic()
    if now - _last_tick >= TICK:
        _conn.send(("tick", _ticks))
        _ticks, _last_tick = 0, now


def _serve(conn: Connection, inherited: list[Connection]) -> None:
    """A worker's life: run tasks until told to stop or until the parent is gone."""
    global _conn, _ticks
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    for other in inherited:  # else the parent's death would not close this worker's pipe
        other.close()
    _conn = conn
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        fn, arg = task
        cpu = time.process_time()
        try:
            result = fn(arg)
        except Stopped:
            return
        except OSError as exc:
            reply: tuple = ("error", f"{type(exc).__name__}: {exc}")
        except Exception:  # a bug: the parent shows the whole traceback
            reply = ("error", traceback.format_exc())
        else:
            reply = ("done", result, time.process_time() - cpu)
        try:
            conn.send(("tick", _ticks))
            conn.send(reply)
        except OSError:  # the parent is gone
            return
        _ticks = 0


def _death(pid: int, code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (the kernel's OOM killer does this when memory runs out)" if -code == signal.SIGKILL else ""
        return f"worker process {pid} was killed by {name}{hint}"
    return f"worker process {pid} exited unexpectedly (code {code})"


class Workers:
    """``processes`` forked workers; ``imap`` runs tasks on them, ``close`` stops them all."""

    def __init__(self, processes: int, window: int | None = None) -> None:
        self.window = window or 2 * processes
        self.cpu = 0.0  # worker CPU seconds of the finished tasks
        self._procs, self._conns = [], []
        # Signals are blocked across the forks (a worker that got one before ignoring it would
        # die with a traceback) and the parent's objects frozen out of the cyclic GC, so the
        # workers' collections never touch, hence never copy, the parent's big source lists.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        gc.freeze()
        try:
            try:
                self._start(processes)
            finally:
                gc.unfreeze()
                signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a signal that came meanwhile is raised here
        except BaseException:
            self.close()
            raise

    def _start(self, processes: int) -> None:
        ctx = get_context("fork")
        for _ in range(processes):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(theirs, [*self._conns, mine]))
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(mine)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _failed(self, ready: list) -> None:
        for proc in self._procs:
            if proc.sentinel in ready:
                proc.join()
                raise WorkerError(_death(proc.pid, proc.exitcode))

    def imap(self, fn: Callable[[Any], Any], args: Iterable, on_tick: Callable[[int], Any] | None = None) -> Iterator:
        """``fn(arg)`` for each of ``args`` on the workers, yielded in order; at most ``window`` unconsumed."""
        args, idle, busy = iter(args), list(range(len(self._procs))), {}  # busy: worker -> task number
        done: dict[int, Any] = {}
        started = consumed = 0
        more = True
        while True:
            while more and idle and started - consumed < self.window:
                try:
                    arg = next(args)
                except StopIteration:
                    more = False
                    break
                worker = idle.pop()
                self._conns[worker].send((fn, arg))
                busy[worker], started = started, started + 1
            if consumed in done:  # then back to the top: the yield may have freed the window
                yield done.pop(consumed)
                consumed += 1
                continue
            if not more and consumed == started:
                return
            ready = wait([self._conns[w] for w in busy] + [p.sentinel for p in self._procs])
            self._failed(ready)
            for worker in [w for w in busy if self._conns[w] in ready]:
                reply = self._conns[worker].recv()
                if reply[0] == "tick":
                    if on_tick is not None and reply[1]:
                        on_tick(reply[1])
                    continue
                if reply[0] == "error":
                    raise WorkerError(reply[1])
                done[busy.pop(worker)] = reply[1]
                self.cpu += reply[2]
                idle.append(worker)

    def map(self, fn: Callable[[Any], Any], args: Iterable) -> list:
        """``list(imap(fn, args))``."""
        return list(self.imap(fn, args))

    def close(self, grace: float = GRACE) -> None:
        """Stop every worker (within ``grace`` seconds, then by SIGKILL) and wait until all are gone.

        Closing its pipe is what stops a worker: an idle one reads the stop (or end of file), a
        busy one sees it at its next ``checkpoint``, one blocked sending a result gets a broken
        pipe.  Nothing is read back here: an interrupt may have cut a message in half.
        """
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
            conn.close()
        deadline = time.monotonic() + grace
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        self._procs, self._conns = [], []
