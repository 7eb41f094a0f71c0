"""Resume support: a per-split journal of finished shards.

After each shard is renamed into place, one JSON line records it: the range of input
positions it covers (written or skipped), its checksum, and its converted/skipped entries.
A re-run keeps the longest prefix of journal entries whose tar still matches its sha256,
deletes everything after it, and restarts from the first position not covered.

Re-hashing every finished shard is the price of trusting nothing on disk: ImageNet's ~31 GB
of shards take ~19 s at the 1.65 GB/s one core of the development machine hashes (docs/benchmarks.md,
"Resume"; ``bench/cpu/shard_check.json``), so the caller hashes them on all its workers
(``Verifier``) and says so before it starts.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from shards.tarwriter import atomic_write_text

Verifier = Callable[[list[Path]], list[str]]  # tar files -> their sha256, in order


class Journal:
    """Append-only record of the finished shards of one split directory."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = directory
        self.path = directory / ".journal.jsonl"
        self.fingerprint = fingerprint

    def entries(self) -> list[dict]:
        """The journal's entries when it is of this fingerprint (else none), up to a line cut short."""
        return self._read()[0]

    def _read(self) -> tuple[list[dict], int]:
        """(``entries``, how many shards a journal of another fingerprint lists: written again)."""
        if not self.path.is_file():
            return [], 0
        lines = self.path.read_text().splitlines()
        try:
            same = not lines or json.loads(lines[0]).get("fingerprint") == self.fingerprint
        except json.JSONDecodeError:
            same = False
        if not same:
            return [], len(lines) - 1  # different inputs or settings: nothing can be kept
        entries = []
        for line in lines[1:]:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by an interrupt ends the usable prefix
        return entries, 0

    def _verified_prefix(self, entries: list[dict], verify: Verifier) -> list[dict]:
        candidates, position = [], 0
        for entry in entries:
            files = [self.directory / entry[k] for k in ("tar", "index") if entry[k]]
            if entry["start"] != position or not all(f.is_file() for f in files):
                break
            candidates.append(entry)
            position = entry["end"]
        tars = [self.directory / e["tar"] for e in candidates if e["tar"]]
        digests = dict(zip(tars, verify(tars)))
        kept = []
        for entry in candidates:
            if entry["tar"] and digests[self.directory / entry["tar"]] != entry["sha256"]:
                break
            kept.append(entry)
        return kept

    def resume(self, prefix: str, verify: Verifier) -> list[dict]:
        """Verified entries to keep; every other ``prefix-*`` file in the directory is removed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        entries, discarded = self._read()
        if discarded:  # for ImageNet hours of work again: a re-run said nothing of why
            print(f"shards: {self.directory}: its {discarded} finished shard(s) were cut from other inputs or settings "
                  "(an image added, removed or changed in size; another seed, size, quality or shard limit): writing "
                  "them again", flush=True)
        kept = self._verified_prefix(entries, verify)
        keep = {e[k] for e in kept for k in ("tar", "index") if e[k]}
        for path in self.directory.iterdir():
            stale = path.name.startswith(f"{prefix}-") and path.name not in keep
            if stale or path.name.endswith(".tmp"):
                path.unlink()
        self._rewrite(kept)
        return kept

    def _rewrite(self, entries: list[dict]) -> None:
        lines = [{"fingerprint": self.fingerprint}, *entries]
        atomic_write_text(self.path, "".join(json.dumps(line) + "\n" for line in lines))

    def append(self, entry: dict) -> None:
        """Record one finished shard (called after its files are in place)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
