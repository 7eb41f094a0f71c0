"""Write the splits: each worker writes whole shards; this process publishes them in order.

The plan is fixed before any image is decoded: each split, in its writing order (train
shuffled globally, val sorted), is cut into runs of ``shard_samples`` consecutive input
positions, and a run is one task.  A worker decodes, resizes and encodes the run's images and
writes the tar and its DALI index itself, under temporary names; this process only renames
finished shards into place in plan order (which numbers them), journals them and keeps the
manifest's accounting.  So the bytes depend on the inputs, their order and the settings, never
on worker count or timing; and the parent handles a few messages per shard instead of every
encoded image (before, it received them all: ~0.14 s of its CPU per 840 images, a ceiling of
~7.5-12k images/s for the whole run, with nothing bounding the results queued for it).

A run usually gives one shard.  Unusable images leave it short (the positions are planned,
the skips are not); a run whose images are all unusable gives none; with ``shard_bytes`` a
run that would pass the limit is cut into more tars.  An image whose bytes alone pass it gets a
tar of its own (a tar is not cut inside an image), which the journal and the manifest list
under ``oversize``: before, that tar passed the limit without a word.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.progress import progress
from shards.config import SAMPLE_BYTES_PER_PIXEL, ShardConfig
from shards.imaging import BadImage, prepare
from shards.journal import Journal, Verifier
from shards.sources import Source, TooLarge, read_bytes
from shards.tarwriter import Serialized, ShardWriter, Written, publish, serialize, tar_overhead
from shards.workers import Workers, checkpoint

Row = tuple[str, str | None, int, int, int]  # (path, tar, offset, size, class index): a compact Source


@dataclass(frozen=True)
class Encoding:
    """What a worker needs besides its run: the output settings and the class list."""

    size: int
    quality: int
    shard_bytes: int
    root: str
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    """One task: consecutive input positions of a split, written as one shard (or more, see above)."""

    split: str
    directory: str
    start: int
    rows: list[Row]
    encoding: Encoding


@dataclass
class Part:
    """One tar a run produced (``written`` None: every image of its range was unusable)."""

    start: int
    end: int
    written: Written | None
    converted: list[dict]
    skipped: list[dict]
    class_counts: list[int]
    oversize: list[tuple[str, int]] = field(default_factory=list)  # (path, bytes of tar) of an image past shard_bytes


def run_length(cfg: ShardConfig) -> int:
    """Input positions per planned shard."""
    if cfg.shard_samples:
        return cfg.shard_samples
    return max(1, int(cfg.shard_bytes // (SAMPLE_BYTES_PER_PIXEL * cfg.size * cfg.size)))


def _components(jpeg: bytes, label: int, source: Source, root: str) -> dict[str, bytes]:
    path = source.path[len(root) + 1:] if source.path.startswith(root + "/") else source.path
    meta = {"wnid": source.wnid, "class": label, "source": path}
    return {"jpg": jpeg, "cls": str(label).encode(), "json": json.dumps(meta, sort_keys=True).encode()}


def _encode(run: Run, position: int, row: Row) -> tuple[Serialized | None, str | None]:
    """(tar-ready sample, conversion note) for a usable image, (None, reason) for a skipped one."""
    path, tar, offset, size, label = row
    enc = run.encoding
    source = Source(run.split, enc.classes[label], path, tar, offset, size)
    try:
        prepared = prepare(read_bytes(source), enc.size, enc.quality)
    except (BadImage, TooLarge) as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"cannot read ({exc})"
    sample = serialize(f"{run.split}-{position:08d}", _components(prepared.jpeg, label, source, enc.root))
    return sample, prepared.note


class _Open:
    """The tar being filled by a worker, with the bookkeeping its journal entry needs."""

    def __init__(self, run: Run, start: int) -> None:
        self.start = start
        stem = f"{run.split}-at{start:08d}-{os.getpid()}"  # unique: no two processes share a temp file
        self.writer = ShardWriter(Path(run.directory), stem)
        self.converted: list[dict] = []
        self.skipped: list[dict] = []
        self.class_counts = [0] * len(run.encoding.classes)
        self.oversize: list[tuple[str, int]] = []

    def full(self, shard_bytes: int, next_bytes: int) -> bool:
        w = self.writer
        return bool(shard_bytes) and w.samples > 0 and w.size + next_bytes + tar_overhead() > shard_bytes

    def add(self, sample: Serialized, path: str, shard_bytes: int) -> None:
        """Append ``sample`` (``full`` said it fits, or the tar is empty); an image past the limit
        alone (then the only one in this tar: the next one finds it full) is noted: its ``path``
        and the bytes of the least tar that holds it."""
        if shard_bytes and len(sample.blob) + tar_overhead() > shard_bytes:
            self.oversize.append((path, len(sample.blob) + tar_overhead()))
        self.writer.add(sample)

    def close(self, end: int) -> Part:
        written = self.writer.close() if self.writer.samples else None
        if written is None:
            self.writer.abort()
        return Part(self.start, end, written, self.converted, self.skipped, self.class_counts, self.oversize)


def write_run(run: Run) -> tuple[str, list[Part]]:
    """Worker task: encode and write one run; its parts, still under temporary names."""
    parts: list[Part] = []
    shard = _Open(run, run.start)
    try:
        for i, row in enumerate(run.rows):
            position = run.start + i
            sample, note = _encode(run, position, row)
            checkpoint()
            entry = {"path": row[0], "reason": note, "split": run.split}
            if sample is None:
                shard.skipped.append(entry)
                continue
            if shard.full(run.encoding.shard_bytes, len(sample.blob)):
                parts.append(shard.close(position))
                shard = _Open(run, position)
            shard.add(sample, row[0], run.encoding.shard_bytes)
            shard.class_counts[row[4]] += 1
            if note:
                shard.converted.append(entry)
        parts.append(shard.close(run.start + len(run.rows)))
    except BaseException:
        shard.writer.abort()
        for part in parts:
            if part.written is not None:
                for tmp in (part.written.tar_tmp, part.written.index_tmp):
                    Path(tmp).unlink(missing_ok=True)
        raise
    return run.split, parts


@dataclass
class SplitResult:
    """What one split produced, for the manifest."""

    shards: list[dict] = field(default_factory=list)
    converted: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)
    oversize: list[dict] = field(default_factory=list)

    def absorb(self, entry: dict) -> None:
        """Add one journal entry (one of an older journal has no ``oversize``)."""
        if entry["tar"]:
            self.shards.append({k: entry[k] for k in ("tar", "index", "samples", "bytes", "sha256")})
        self.converted += entry["converted"]
        self.oversize += entry.get("oversize", [])
        self.skipped += entry["skipped"]
        for c, n in enumerate(entry["class_counts"]):
            self.class_counts[c] += n


class SplitWriter:
    """One split's plan and its published shards (resumes from its journal)."""

    def __init__(self, cfg: ShardConfig, split: str, sources: list[Source], classes: list[str],
                 journal: Journal, verify: Verifier, root: str) -> None:
        self.cfg, self.split, self.sources, self.journal = cfg, split, sources, journal
        self.index_of = {w: i for i, w in enumerate(classes)}
        self.encoding = Encoding(cfg.size, cfg.quality, cfg.shard_bytes, root, tuple(classes))
        self.result = SplitResult(class_counts=[0] * len(classes))
        kept = journal.resume(split, verify)
        for entry in kept:
            self.result.absorb(entry)
        self.start = kept[-1]["end"] if kept else 0
        self.done = self.start  # input positions covered by published shards

    def runs(self) -> Iterator[Run]:
        """Worker tasks for every position not covered by the journal (a resume may start mid-run)."""
        length, position = run_length(self.cfg), self.start
        while position < len(self.sources):
            end = min(len(self.sources), (position // length + 1) * length)
            rows = [(s.path, s.tar, s.offset, s.size, self.index_of[s.wnid]) for s in self.sources[position:end]]
            yield Run(self.split, str(self.journal.directory), position, rows, self.encoding)
            position = end

    def publish(self, parts: list[Part]) -> None:
        """Rename a run's tars into place under the next shard numbers and journal them, in order."""
        for part in parts:
            info = None
            if part.written is not None:
                info = publish(part.written, self.journal.directory, f"{self.split}-{len(self.result.shards):06d}")
            entry = {"tar": info.tar if info else None, "index": info.index if info else None,
                     "samples": info.samples if info else 0, "bytes": info.bytes if info else 0,
                     "sha256": info.sha256 if info else None, "start": part.start, "end": part.end,
                     "converted": part.converted, "skipped": part.skipped, "class_counts": part.class_counts,
                     "oversize": [{"path": path, "split": self.split, "tar": info.tar, "bytes": size}
                                  for path, size in part.oversize]}
            self.journal.append(entry)
            self.result.absorb(entry)
            self.done = part.end

    def remove_temps(self) -> None:
        """Drop unfinished temp files (interrupts, errors), once no worker can write any more."""
        for tmp in self.journal.directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def write_splits(cfg: ShardConfig, writers: list[SplitWriter], workers: Workers) -> None:
    """Run every split's remaining runs on the workers; publish each run's shards in plan order.

    One stream for all splits keeps the workers busy across the split boundary.
    """
    by_split = {w.split: w for w in writers}
    runs = itertools.chain.from_iterable(w.runs() for w in writers)
    bar = progress(sum(len(w.sources) for w in writers), "shards", initial=sum(w.start for w in writers),
                   smoothing=0.05)
    try:
        for split, parts in workers.imap(write_run, runs, on_tick=bar.update):
            by_split[split].publish(parts)
    finally:
        bar.close()
