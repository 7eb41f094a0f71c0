"""What the shard check (``service.shard_check``) remembers between starts: ``<out>/shard-checks.json``.

Each result is kept under the tar's path with its size, mtime_ns, ctime_ns, inode and the
manifest's sha256, so a restart hashes only the shards whose file changed (a rewrite or a copy
changes the ctime even where the mtime is put back).  Bit rot under an untouched inode is not
seen after the first check; delete the file to check again.  Only rank 0 reads and writes it; a
rank that reads a copy of its own (another node's) keeps ``shard-checks.rank<r>.json``.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shards.manifest import Manifest, Shard
from shards.tarwriter import atomic_write_text

NAME = "shard-checks.json"
FORMAT = "alexnet2012-shard-checks"


def file_key(shard: Shard) -> dict[str, int | str]:
    """What identifies the file a result was found on: the same key later is the same bytes."""
    st = shard.tar.stat()
    try:  # the deep check reads every entry of the index too (shards.index_check.index_entries_defect)
        ix = shard.index.stat()
        index = [ix.st_size, ix.st_mtime_ns, ix.st_ctime_ns, ix.st_ino]
    except OSError:
        index = None
    return {"sha256": shard.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "index": index}


class CheckMemory:
    """The results of earlier checks of ``manifest``'s shards, in ``out/NAME``; ``read`` False
    (ranks other than 0) starts empty.  A file that cannot be written is warned about once."""

    def __init__(self, out: Path, manifest: Manifest, warn: Callable[[str], None], read: bool = True,
                 name: str = NAME) -> None:
        self.path, self.manifest, self._warn = out / name, manifest, warn
        self._entries = self._read() if read else {}
        self._lock = threading.Lock()  # written from the hashing threads
        self._write_failed = False

    def _read(self) -> dict[str, dict]:
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: everything is checked again
        return record.get("shards", {}) if record.get("format") == FORMAT else {}

    def entry(self, shard: Shard) -> dict:
        """The remembered result for ``shard``'s path (empty if none), whatever its file is now."""
        return self._entries.get(str(shard.tar), {})

    def cached(self, shard: Shard) -> tuple[bool, str | None]:
        """(known, problem) from an earlier check of this very file."""
        entry = self._entries.get(str(shard.tar))
        if entry is None or any(entry.get(k) != v for k, v in file_key(shard).items()):
            return False, None
        return True, entry.get("problem")

    def remember(self, shard: Shard, key: dict, problem: str | None) -> None:
        """Keep the result found on the file ``key`` names (taken before it was hashed)."""
        now = time.time()
        listed = {str(s.tar) for split in self.manifest.splits.values() for s in split.shards}
        with self._lock:
            old = self._entries.get(str(shard.tar), {})
            ok_at = now if problem is None else (old.get("ok_at") if old.get("sha256") == shard.sha256 else None)
            self._entries[str(shard.tar)] = {**key, "problem": problem, "checked_at": now, "ok_at": ok_at}
            record = {"format": FORMAT, "version": 1, "manifest": str(self.manifest.root / "manifest.json"),
                      "shards": {k: v for k, v in self._entries.items() if k in listed}}
            self._write(record)

    def _write(self, record: dict) -> None:
        try:
            atomic_write_text(self.path, json.dumps(record, indent=1) + "\n")
        except OSError as exc:
            if not self._write_failed:
                self._write_failed = True
                self._warn(f"service: cannot write {self.path} ({exc.strerror or exc}): shard checks are not "
                           "remembered, a restart checks the shards again")
