"""Write one WebDataset tar shard and its DALI index, atomically and reproducibly.

Members are plain ustar entries with fixed metadata (mtime 0, uid/gid 0, mode 0644), so the
same samples always give the same bytes and the same sha256.  The index is written in the
format of DALI's ``wds2idx`` (``v1.2 <samples>`` then one line per sample of
``<ext> <data offset> <size> <member name>`` triples), computed while the tar is written.
Both files appear under their final names only once complete (temp files + fsync, then
``publish`` renames them).
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BLOCK = 512


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records about a finished shard."""

    tar: str  # file name, relative to the split directory
    index: str
    samples: int
    bytes: int
    sha256: str


def member_bytes(size: int) -> int:
    """Bytes one member of ``size`` data bytes occupies in a tar (header + padded data)."""
    return BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK


def tar_overhead() -> int:
    """The two zero blocks that end every tar (tarfile pads the archive to a full record too)."""
    return 2 * BLOCK


@dataclass(frozen=True)
class Serialized:
    """One sample as the exact tar bytes of its members (headers + padded data).

    Tar headers hold no offsets, so a sample serialises the same wherever it lands: workers
    build these in parallel and the shard writer only appends them.
    """

    blob: bytes
    members: tuple[tuple[str, int, int, str], ...]  # (ext, data offset in blob, size, member name)


def serialize(key: str, components: dict[str, bytes]) -> Serialized:
    """The tar members ``key.ext`` of one sample, in the order given, with fixed metadata."""
    if "." in key:
        raise ValueError(f"sample key {key!r} must not contain '.' (DALI splits extensions at the first dot)")
    chunks, members, offset = [], [], 0
    for ext, data in components.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uname = info.gname = ""
        chunks += [info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"), data, b"\0" * (-len(data) % BLOCK)]
        members.append((ext, offset + BLOCK, len(data), info.name))
        offset += member_bytes(len(data))
    return Serialized(b"".join(chunks), tuple(members))


@dataclass(frozen=True)
class Written:
    """A closed shard under temporary names, waiting for ``publish`` to give it its final name."""

    tar_tmp: str
    index_tmp: str
    samples: int
    bytes: int
    sha256: str


class ShardWriter:
    """Append serialised samples to one shard; ``close`` finishes its tar and index under temp names.

    The final name (``train-000012``) is the shard's position among the split's shards, which
    only the process that publishes shards in order knows; a worker writing a shard names its
    temp files after ``stem`` (unique per run and process) and ``publish`` renames them.
    """

    def __init__(self, directory: Path, stem: str) -> None:
        self._tmp = directory / f".{stem}.tar.tmp"
        self._idx_tmp = directory / f".{stem}.idx.tmp"
        self._file = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self._index_lines: list[str] = []
        self.samples = 0
        self.size = 0

    def _write(self, data: bytes) -> None:
        self._hash.update(data)
        self._file.write(data)

    def add(self, sample: Serialized) -> None:
        """Append one sample and remember its members' offsets for the index."""
        self._write(sample.blob)
        self._index_lines.append(" ".join(f"{ext} {self.size + offset} {size} {name}"
                                          for ext, offset, size, name in sample.members))
        self.size += len(sample.blob)
        self.samples += 1

    def close(self) -> Written:
        """Finish the tar and the index (fsynced, still under their temp names)."""
        # The end of a tar as Python's tarfile writes it: two zero blocks, then zeros up to a
        # whole 10 KiB record.
        end = tar_overhead()
        self._write(b"\0" * (end + (-(self.size + end) % tarfile.RECORDSIZE)))
        self._file.flush()
        os.fsync(self._file.fileno())
        nbytes = self._file.tell()
        self._file.close()
        index = f"v1.2 {self.samples}\n" + "".join(line + "\n" for line in self._index_lines)
        _write_synced(self._idx_tmp, index.encode())
        return Written(str(self._tmp), str(self._idx_tmp), self.samples, nbytes, self._hash.hexdigest())

    def abort(self) -> None:
        """Drop the unfinished shard (used on errors and stops)."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)


def publish(written: Written, directory: Path, name: str) -> ShardInfo:
    """Give a closed shard its final names: the index lands first, so a tar always has its index."""
    tar, index = f"{name}.tar", f"{name}.idx"
    os.replace(written.index_tmp, directory / index)
    os.replace(written.tar_tmp, directory / tar)
    return ShardInfo(tar, index, written.samples, written.bytes, written.sha256)


def index_of(tar: Path) -> bytes:
    """The DALI index of a shard, read back from its tar: the bytes ``ShardWriter`` wrote with it
    (members grouped into samples by the name before their first dot, in tar order).  For a tar
    that still has its manifest sha256 but an index that no longer fits it."""
    samples: list[list[str]] = []
    last = None
    with tarfile.open(tar) as f:
        for m in f:
            key, ext = m.name.split(".", 1)
            if key != last:
                samples.append([])
                last = key
            samples[-1].append(f"{ext} {m.offset_data} {m.size} {m.name}")
    return (f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)).encode()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temp file in the same directory, then rename.
    A write that fails (a full disk) leaves no temp file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` for text files (manifest, journal)."""
    atomic_write_bytes(path, text.encode())


class HashStopped(Exception):
    """``sha256_file`` gave up because its ``stop`` said so."""


def sha256_file(path: Path, stop: Callable[[], bool] | None = None) -> str:
    """sha256 of a file, read in 1 MiB blocks.  ``stop``, polled before each block (a few hundred
    per second per core), raises ``HashStopped`` when true: a check of a ~140 GB dataset must give
    way to a SIGTERM within torchrun's 30 s, also inside one large or slowly read shard."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while not (stop is not None and stop()) and (block := f.read(1 << 20)):
            digest.update(block)
    if stop is not None and stop():
        raise HashStopped(str(path))
    return digest.hexdigest()
