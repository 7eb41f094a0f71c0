"""Are the shards still the ones ``make shards`` wrote?  Each tar's sha256 against the manifest's,
before or while training reads it, remembered in the run directory.

Why a checksum: a same-size corruption inside a JPEG (a disk, a copy, network storage) still
decodes.  libjpeg prints "Corrupt JPEG data: premature end of data segment" on stderr and DALI
trains on the garbled pixels with no error.  DALI 2.4 offers no way to see that warning: its CPU
decoder is nvImageCodec 0.9's libjpeg-turbo plugin, which takes two options (fancy_upsampling,
fast_idct) and leaves libjpeg's default message handler writing to file descriptor 2; no
output, error or option of the pipeline carries it, and ``fn.peek_image_shape`` reads only the
header.  The manifest's per-tar sha256 sees every changed byte, whatever the decoder does.

When (``data.verify``): ``background`` (default) starts training at once while rank 0 hashes the
shards not checked before in one thread at the lowest CPU priority (nice 19), in the order the
ranks' readers first reach them; ``before`` builds the loaders only once every shard is checked (a
thread per core, up to 16: nothing unchecked is ever read). Cost (``bench/cpu/shard_check.json``,
docs/benchmarks.md "Shard check"): sha256 runs at 1.6-1.8 GB/s per core (0.8 in an earlier run
with both cores taken, no record), so ImageNet's ~31 GB of shards is about 19 s of one core once,
next to a run of hours; at nice 19 next to training the 2-core machine's leftovers hashed
0.03-0.05 GB/s (about 13 minutes). A stop
request (SIGTERM, SIGINT, SIGHUP; to any rank: ``service.rank_stops``) during ``before``'s check
ends it within a block of each hash (torchrun's grace is 30 s, a shard on slow storage can take
longer): exit 0 before anything was
trained, one line saying so (``StoppedAtStart``), the shards checked so far remembered and the rest
checked at the next start.

Remembered: ``<out>/shard-checks.json`` (``service.shard_memory``), so that a restart hashes
only the shards whose file changed.

What then (``data.on_corrupt``): ``stop`` (default) exits 1 naming the shard and the damaged
sample(s) and, when the background pass found it after training began, which steps may have
used it.  ``skip`` leaves the shard out of the readers when they are built (DALI reads a fixed
list of tars and cannot skip a sample, so it needs ``verify before``), counts its samples in
``alexnet_samples_failed_total`` (rank 0's only: once for the job) and names shard and samples
in the log; a restart with the shard repaired reads it again (its epoch restarts: the loader's
saved position was for other tars).

Several ranks, who checks which copy of the shards and how every rank follows the verdicts:
``service.shard_ranks``.

Each file once at start: rank 0's look at every shard (its size and its index, read whole: ~1000
train indexes on ImageNet) is the start's only one there, the manifest's own file check
(``shards.manifest.check_files``) runs on the other ranks alone, on their view of the files (a
node of their own), and the hash before training does not read an index again.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

from service.config import TrainConfig
from service.dist import Ranks
from service.errors import DataError
from service.metrics import ServiceMetrics
from service.runlog import RunLog
from service.shard_findings import Finding, consumed, describe, done_line, hint, size_text
from service.shard_memory import CheckMemory, file_key
from service.shard_ranks import copy_of, merged, refuse_empty
from service.signals import StopFlag
from service.status import StatusBoard
from shards.manifest import Manifest, Shard, check_files, shard_problem
from shards.tarwriter import HashStopped


def reading_order(shards: tuple[Shard, ...], ranks: int) -> list[int]:
    """Shard indices in the order the readers first reach them: each rank reads a contiguous
    share from its start, so the k-th shard of every share comes before any (k+1)-th."""
    n = len(shards)

    def offset(i: int) -> int:  # position in its rank's share, which starts at ceil(rank * n / ranks)
        rank = i * ranks // n
        return i + (-rank * n // ranks)

    return sorted(range(n), key=lambda i: (offset(i), i))


def lowest_priority() -> None:
    """Nice 19 for the calling thread only (a Linux thread is a task): the hash yields every core
    the loop, DALI and torch want."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class ShardCheck:
    """The check of one run (see the module docstring); ``prepare``, ``start``, ``poll`` per step,
    ``finish`` at the end of a finished run, ``close`` always."""

    def __init__(self, cfg: TrainConfig, manifest: Manifest, ranks: Ranks, log: RunLog,
                 metrics: ServiceMetrics, stop: StopFlag | None = None, board: StatusBoard | None = None) -> None:
        self.settings, self.manifest, self.ranks, self.log, self.metrics = cfg.data, manifest, ranks, log, metrics
        self.stop = stop  # a stop request ends the check before training (the loop handles it after)
        self.board = board  # its heartbeat: the check before training can outlast http.stall_seconds
        self.out, self.own = cfg.out, ranks.is_main  # own: this rank checks its files (``prepare``)
        self.memory = CheckMemory(cfg.out, manifest, log.warn, read=ranks.is_main)
        self._todo: list[tuple[str, Shard]] = []
        self._found: list[Finding] = []  # by the background thread, read by the loop
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_step = 0

    # -- at start ------------------------------------------------------------------------------

    def prepare(self) -> frozenset[str]:
        """Before the loaders are built: check what must be (sizes and indexes always, contents
        with ``before``), then act on every finding on every rank; returns the tar names to leave
        out.  A rank that reads rank 0's files then checks its own view of them but those
        (``ManifestError``); one that reads a copy of its own checks that as rank 0 does."""
        copies = self.ranks.gather(copy_of(self.manifest))
        # The first rank reading each copy checks it: rank 0 its files, the lowest rank of another
        # node with its own copy that copy (once per node, not once per GPU), the rest follow.
        if copies.index(copies[self.ranks.rank]) == self.ranks.rank and self.ranks.rank != 0:
            self.own = True
            self.memory = CheckMemory(self.out, self.manifest, self.log.warn,
                                      name=f"shard-checks.rank{self.ranks.rank}.json")
        verdict = self._check_at_start() if self.own else None  # or why it stopped
        with self.board.kept_alive("waiting for the shard check") if self.board and self.ranks.distributed \
                else nullcontext():
            verdicts = self.ranks.gather(verdict)
        findings = merged(verdicts)
        if findings and self.settings.on_corrupt == "stop":
            first = findings[0]
            more = f" (and {len(findings) - 1} more shard(s))" if len(findings) > 1 else ""
            raise DataError(f"{first.text}{more}; found before this start trained on anything; "
                            f"{hint(first)}")
        for f in findings:
            self._skip(f)
        excluded = frozenset(f.shard.tar.name for f in findings)
        refuse_empty(self.manifest, excluded)
        if not self.own:  # those who checked had _check_at_start look at each file, once
            check_files(self.manifest, exclude=excluded)
        return excluded

    def _skip(self, f: Finding) -> None:
        """Every rank leaves the shard out of its reader and logs it in its own JSON log, but the job
        left its samples out once: rank 0 (whose verdict it is) counts them and says so, so that
        ``sum(alexnet_samples_failed_total)`` over the ranks and the console each say it once."""
        self.log.event("shard_skipped", split=f.split, shard=str(f.shard.tar), samples=f.shard.samples,
                       reason=f.text)
        if self.ranks.is_main:
            self.log.warn(f"service: {f.text}; skipped: left out of the {f.split} reader, {f.shard.samples} "
                          "sample(s) not used (alexnet_samples_failed_total)")
            self.metrics.samples_failed.inc(f.shard.samples)

    def _check_at_start(self) -> list[Finding] | str:
        findings, todo, cached = [], [], 0
        for split, shard in self._shards():
            # verify before: every index entry now, in the one read of the index (the hash then reads no index)
            problem = shard_problem(shard, deep=False, entries=self.settings.verify == "before")
            if problem is None:
                known, problem = self.memory.cached(shard)
                if not known:
                    todo.append((split, shard))
                    continue
                cached += 1
            if problem:
                findings.append(describe(split, shard, problem, self.manifest.num_classes))
        if self.settings.verify == "before" and todo:
            hashed = self._hash_now(todo)
            if isinstance(hashed, str):
                return hashed
            findings += hashed
            todo = []
        self._todo = todo
        self.log.say(f"shards: {cached} checked before ({self.memory.path.name}), {len(findings)} bad, {len(todo)} "
                     + (f"({size_text(sum(s.bytes for _, s in todo))}) to check in the background" if todo
                        else "left to check"))
        return findings

    def _hash_now(self, todo: list[tuple[str, Shard]]) -> list[Finding] | str:
        """Hash ``todo`` on every core: the findings, or (a stop request) the line saying so."""
        total, start = sum(s.bytes for _, s in todo), time.monotonic()
        self.log.say(f"shards: checking {len(todo)} shard(s), {size_text(total)}, against the manifest before "
                     "training (data.verify before)...")
        # hashlib lets go of the GIL; beyond ~16 readers the storage, not the CPU, sets the pace
        with ThreadPoolExecutor(min(len(os.sched_getaffinity(0)), 16)) as pool:
            problems = list(pool.map(lambda shard: self._check(shard, self._stop_requested, index=False),
                                     [s for _, s in todo]))
        if HashStopped in problems:
            return self._interrupted(sum(p is not HashStopped for p in problems), len(todo))
        bad = [describe(split, shard, p, self.manifest.num_classes) for (split, shard), p in zip(todo, problems) if p]
        self._say_done(len(todo), len(bad), total, time.monotonic() - start)
        return bad

    def _shards(self) -> list[tuple[str, Shard]]:
        out = []
        for name in ("train", "val"):
            shards = self.manifest.splits[name].shards
            out += [(name, shards[i]) for i in reading_order(shards, self.ranks.world_size)]
        return out

    # -- while training ------------------------------------------------------------------------

    def start(self, step: int) -> None:
        """Training begins at ``step``: rank 0 hashes the rest in the background."""
        self._start_step = step
        if self._todo and self.own:
            self._thread = threading.Thread(target=self._background, name="shard-check", daemon=True)
            self._thread.start()

    def _background(self) -> None:
        lowest_priority()
        total, start = sum(s.bytes for _, s in self._todo), time.monotonic()
        for split, shard in self._todo:
            if self._halt.is_set():
                return
            problem = self._check(shard, self._halt.is_set)
            if problem is HashStopped:  # closed
                return
            if problem:
                self._found.append(describe(split, shard, problem, self.manifest.num_classes))
        self._say_done(len(self._todo), len(self._found), total, time.monotonic() - start)

    def poll(self, step: int) -> None:
        """After each step: a stop (``DataError``) once the background pass found a bad shard."""
        if self._found:
            self._halt.set()
            first = self._found[0]
            used = consumed(first, step, self._start_step, self.memory.entry(first.shard))
            raise DataError(f"{first.text}; found by the background check at step {step}: {used}; "
                            f"{hint(first)}")

    def finish(self, step: int) -> None:
        """A finished run: wait for the background pass, so no run ends 0 on unchecked data."""
        if self._thread is not None and self._thread.is_alive():
            self.log.say("shards: waiting for the background check to finish before saying the run is done...")
            self._thread.join()
        self.poll(step)

    def close(self) -> None:
        """Stop the background pass after its current shard (the file keeps what was done)."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join()

    # -- results -------------------------------------------------------------------------------

    def _check(self, shard: Shard, stop: Callable[[], bool], index: bool = True) -> str | None | type[HashStopped]:
        """The shard's problem (remembered), or ``HashStopped`` once ``stop()``: nothing remembered.
        ``index`` False: not its index again (the hash before training: ``_check_at_start`` has
        just read it; the background pass, later, reads it again, it may have changed since)."""
        try:
            key = file_key(shard)
        except OSError:  # gone since the start's look at it: ``shard_problem`` says so, nothing to remember
            key = None
        try:
            problem = shard_problem(shard, stop=stop, index=index)
        except HashStopped:
            return HashStopped
        if key is not None:
            self.memory.remember(shard, key, problem)
        return problem

    def _stop_requested(self) -> bool:
        """Polled while hashing before training, every block of each hash: the heartbeat's too.
        (Not by the background pass: a run that finishes despite a late stop request still waits
        for it, so no run ends 0 on unchecked shards.)"""
        if self.board is not None:
            self.board.beat("checking shards")
        return self.stop is not None and self.stop.requested

    def _interrupted(self, done: int, total: int) -> str:
        why = self.stop.signal_name if self.stop is not None else None
        self.log.event("shard_check_interrupted", reason=why, shards=done, of=total)
        return (f"stopped ({why}) during the shard check before training (data.verify before), after {done} of "
                f"{total} shard(s): nothing was trained or checkpointed; the check runs again at the next start "
                f"(the {done} checked are remembered in {self.memory.path})")

    def _say_done(self, count: int, bad: int, total: int, seconds: float) -> None:
        self.log.say(done_line(count, bad, total, seconds))
        self.log.event("shard_check", shards=count, bad=bad, bytes=total, seconds=round(seconds, 3))
