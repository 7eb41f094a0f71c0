"""Write the splits: process the sources in parallel, in order, into rolling tar shards.

Workers decode/resize/encode (``shards.imaging``) and serialise each sample; this process
receives the results in input order and appends them to the current shard, so shard contents
depend only on the input order, never on worker timing.  Each finished shard is journaled for
resume.
"""
from __future__ import annotations

import itertools
import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path

from common.progress import progress
from shards.config import ShardConfig
from shards.imaging import BadImage, prepare
from shards.journal import Journal
from shards.sources import Source, read_bytes
from shards.tarwriter import Serialized, ShardWriter, serialize, tar_overhead

_SETTINGS: dict = {}


def init_worker(size: int, quality: int, root: str) -> None:
    """Pool initializer: settings for ``process``; the parent alone handles Ctrl-C and SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _SETTINGS.update(size=size, quality=quality, root=root)


def process(task: tuple[str, int, Source, int]) -> tuple[Serialized | None, str | None]:
    """(tar-ready sample, conversion note) for a usable image, (None, reason) for a skipped one.

    The sample is serialised here, in the worker, so the single writing process only appends
    bytes: it stays far from being the bottleneck.
    """
    split, position, source, label = task
    try:
        prepared = prepare(read_bytes(source), _SETTINGS["size"], _SETTINGS["quality"])
    except BadImage as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"cannot read ({exc})"
    sample = serialize(f"{split}-{position:08d}", _components(prepared.jpeg, label, source, _SETTINGS["root"]))
    return sample, prepared.note


def process_batch(tasks: list[tuple[str, int, Source, int]]) -> list[tuple[Serialized | None, str | None]]:
    """``process`` over a batch of consecutive tasks (one message each way per batch)."""
    return [process(task) for task in tasks]


def guided_batches(tasks: Iterator, total: int, largest: int, workers: int) -> Iterator[list]:
    """Consecutive batches of ``tasks`` (``total`` of them) that shrink towards the end.

    Guided self-scheduling: big batches keep the per-message cost low; small ones at the end
    keep every worker busy until the last image instead of one finishing a big batch alone.
    """
    left = total
    while left > 0:
        size = max(1, min(largest, left // (2 * workers)))
        yield list(itertools.islice(tasks, size))
        left -= size


@dataclass
class SplitResult:
    """What one split produced, for the manifest."""

    shards: list[dict] = field(default_factory=list)
    converted: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)

    def absorb(self, entry: dict) -> None:
        """Add one journal entry."""
        if entry["tar"]:
            self.shards.append({k: entry[k] for k in ("tar", "index", "samples", "bytes", "sha256")})
        self.converted += entry["converted"]
        self.skipped += entry["skipped"]
        for c, n in enumerate(entry["class_counts"]):
            self.class_counts[c] += n


class _Open:
    """The shard being filled, with the bookkeeping its journal entry needs."""

    def __init__(self, directory: Path, name: str, start: int, num_classes: int) -> None:
        self.writer = ShardWriter(directory, name)
        self.start = start
        self.converted: list[dict] = []
        self.skipped: list[dict] = []
        self.class_counts = [0] * num_classes

    def entry(self, end: int) -> dict:
        info = self.writer.close() if self.writer.samples else None
        if info is None:
            self.writer.abort()
        return {"tar": info.tar if info else None, "index": info.index if info else None,
                "samples": info.samples if info else 0, "bytes": info.bytes if info else 0,
                "sha256": info.sha256 if info else None, "start": self.start, "end": end,
                "converted": self.converted, "skipped": self.skipped, "class_counts": self.class_counts}


def _full(shard: _Open, cfg: ShardConfig, next_bytes: int) -> bool:
    w = shard.writer
    if cfg.shard_samples and w.samples >= cfg.shard_samples:
        return True
    return bool(cfg.shard_bytes) and w.samples > 0 and w.size + next_bytes + tar_overhead() > cfg.shard_bytes


def _components(jpeg: bytes, label: int, source: Source, root: str) -> dict[str, bytes]:
    path = source.path[len(root) + 1:] if source.path.startswith(root + "/") else source.path
    meta = {"wnid": source.wnid, "class": label, "source": path}
    return {"jpg": jpeg, "cls": str(label).encode(), "json": json.dumps(meta, sort_keys=True).encode()}


class SplitWriter:
    """The rolling shards of one split, fed with results in input order (resumes from its journal)."""

    def __init__(self, cfg: ShardConfig, split: str, sources: list[Source], classes: list[str],
                 journal: Journal) -> None:
        self.cfg, self.split, self.sources, self.journal = cfg, split, sources, journal
        self.index_of = {w: i for i, w in enumerate(classes)}
        self.result = SplitResult(class_counts=[0] * len(classes))
        kept = journal.resume(split)
        for entry in kept:
            self.result.absorb(entry)
        self.start = kept[-1]["end"] if kept else 0
        self._shard: _Open | None = None

    def tasks(self) -> Iterator[tuple[str, int, Source, int]]:
        """Worker tasks for every position not covered by the journal."""
        for p in range(self.start, len(self.sources)):
            yield self.split, p, self.sources[p], self.index_of[self.sources[p].wnid]

    def _open(self, position: int) -> _Open:
        name = f"{self.split}-{len(self.result.shards):06d}"
        return _Open(self.journal.directory, name, position, len(self.index_of))

    def _close(self, end: int) -> None:
        entry = self._shard.entry(end)  # type: ignore[union-attr]
        self.journal.append(entry)
        self.result.absorb(entry)
        self._shard = None

    def add(self, position: int, sample: Serialized | None, note: str | None) -> None:
        """Append the result for ``position`` (skipped when ``sample`` is None)."""
        source = self.sources[position]
        if self._shard is None:
            self._shard = self._open(position)
        if sample is None:
            self._shard.skipped.append({"path": source.path, "reason": note, "split": self.split})
            return
        if _full(self._shard, self.cfg, len(sample.blob)):
            self._close(position)
            self._shard = self._open(position)
        self._shard.writer.add(sample)
        self._shard.class_counts[self.index_of[source.wnid]] += 1
        if note:
            self._shard.converted.append({"path": source.path, "reason": note, "split": self.split})

    def finish(self) -> SplitResult:
        """Close the last shard; the split's result for the manifest."""
        if self._shard is not None:
            self._close(len(self.sources))
        return self.result

    def abort(self) -> None:
        """Drop unfinished temp files (interrupts, errors).

        By directory, not by the open shard alone: an interrupt can land between a temp file's
        creation and the moment this object knows of it.
        """
        if self._shard is not None:
            self._shard.writer.abort()
        for tmp in self.journal.directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def write_splits(cfg: ShardConfig, writers: list[SplitWriter], pool: Pool) -> None:
    """Run every split's remaining work through one ordered stream of worker tasks.

    One stream for all splits keeps the workers busy across the split boundary.
    """
    tasks = itertools.chain.from_iterable(w.tasks() for w in writers)
    total = sum(len(w.sources) - w.start for w in writers)
    batches = pool.imap(process_batch, guided_batches(tasks, total, cfg.chunk, cfg.processes))
    results = itertools.chain.from_iterable(batches)
    bar = progress(sum(len(w.sources) for w in writers), "shards", initial=sum(w.start for w in writers),
                   smoothing=0.05)
    try:
        for writer in writers:
            for position in range(writer.start, len(writer.sources)):
                writer.add(position, *next(results))
                bar.update(1)
            writer.finish()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        bar.close()
