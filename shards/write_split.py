"""Write one split: process its sources in parallel, in order, into rolling tar shards.

Workers decode/resize/encode (``shards.imaging``); this process receives the results in
input order and appends them to the current shard, so shard contents depend only on the
input order, never on worker timing.  Each finished shard is journaled for resume.
"""
from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path

from tqdm import tqdm

from shards.config import ShardConfig
from shards.imaging import BadImage, prepare
from shards.journal import Journal
from shards.sources import Source, read_bytes
from shards.tarwriter import ShardWriter, member_bytes, tar_overhead

_SETTINGS: dict = {}


def init_worker(size: int, quality: int) -> None:
    """Pool initializer: settings for ``process``; the parent alone handles Ctrl-C and SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _SETTINGS.update(size=size, quality=quality)


def process(source: Source) -> tuple[bytes | None, str | None]:
    """(jpeg, conversion note) for a usable image, (None, reason) for one that is skipped."""
    try:
        prepared = prepare(read_bytes(source), _SETTINGS["size"], _SETTINGS["quality"])
    except BadImage as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"cannot read ({exc})"
    return prepared.jpeg, prepared.note


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


def write_split(cfg: ShardConfig, split: str, sources: list[Source], classes: list[str], root: str,
                pool: Pool, journal: Journal) -> SplitResult:
    """Shard ``sources`` (already in final order) into ``cfg.out/split``; resumes from the journal."""
    result = SplitResult(class_counts=[0] * len(classes))
    kept = journal.resume(split)
    for entry in kept:
        result.absorb(entry)
    start = kept[-1]["end"] if kept else 0
    if start == len(sources):
        return result
    index_of = {w: i for i, w in enumerate(classes)}
    shard = _Open(journal.directory, f"{split}-{len(result.shards):06d}", start, len(classes))
    bar = tqdm(total=len(sources), initial=start, desc=f"shards {split}", unit="img", smoothing=0.05)
    try:
        outputs = pool.imap(process, sources[start:], chunksize=cfg.chunk)
        for position, (jpeg, note) in enumerate(outputs, start):
            source = sources[position]
            bar.update(1)
            if jpeg is None:
                shard.skipped.append({"path": source.path, "reason": note, "split": split})
                continue
            sample = _components(jpeg, index_of[source.wnid], source, root)
            if _full(shard, cfg, sum(member_bytes(len(v)) for v in sample.values())):
                entry = shard.entry(position)
                journal.append(entry)
                result.absorb(entry)
                shard = _Open(journal.directory, f"{split}-{len(result.shards):06d}", position, len(classes))
            shard.writer.add(f"{split}-{position:08d}", sample)
            shard.class_counts[index_of[source.wnid]] += 1
            if note:
                shard.converted.append({"path": source.path, "reason": note, "split": split})
        entry = shard.entry(len(sources))
        journal.append(entry)
        result.absorb(entry)
    except BaseException:
        shard.writer.abort()
        raise
    finally:
        bar.close()
    return result

