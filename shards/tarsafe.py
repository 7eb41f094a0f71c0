"""Enumerate tar members in place, without extracting or reading their data.

The raw ILSVRC tars are large (the train tar is ~140 GB of 1000 nested per-class tars), so
the scanner only walks headers: ``tarfile`` in mode ``"r:"`` seeks over each member's data.
A nested tar is opened through a bounded window onto the outer file, which makes its
members' ``offset_data`` relative to the window start; adding the window's offset gives the
absolute byte offset in the outer file, which is all ``shards.sources.read_bytes`` needs.

Members are never extracted, but a name like ``../x`` or a link could still mislead a later
tool that trusts ``Source.path``, so anything but a plain regular file with a relative,
``..``-free name is reported with a reason and never read.
"""
from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO


def unsafe_reason(info: tarfile.TarInfo) -> str | None:
    """Why ``info`` must never be read, or None for a safe regular file or a directory."""
    name = info.name
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return f"unsafe tar member: absolute path {name!r} (never read)"
    if ".." in PurePosixPath(name).parts:
        return "unsafe tar member: path contains '..' (never read)"
    if info.issym():
        return f"unsafe tar member: symlink to {info.linkname!r} (never read)"
    if info.islnk():
        return f"unsafe tar member: hard link to {info.linkname!r} (never read)"
    if info.ischr() or info.isblk():
        return "unsafe tar member: device file (never read)"
    if info.isfifo():
        return "unsafe tar member: fifo (never read)"
    # isreg() is also true for GNU sparse files, whose data is not one contiguous range.
    if info.issparse():
        return "unsupported tar member: sparse file (never read)"
    if not (info.isreg() or info.isdir()):
        return f"unsupported tar member type {info.type!r} (never read)"
    return None


@contextmanager
def open_plain(path: Path | str) -> Iterator[tarfile.TarFile]:
    """Open an uncompressed tar for header-only iteration; compressed tars are rejected.

    Byte offsets only mean something in an uncompressed file, and the real ILSVRC tars are
    uncompressed, so a compressed one gets a ``tarfile.ReadError`` saying what to do.  The
    file is unbuffered: a buffer would read 8 KiB around every 512-byte header.
    """
    with open(path, "rb", buffering=0) as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            raise tarfile.ReadError(
                f"{path}: not an uncompressed tar ({e}); the ILSVRC tars are read in place by byte "
                f"offset, so a compressed copy must be decompressed first (e.g. gunzip)"
            ) from e
        with tar:
            yield tar


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``size`` bytes at ``start`` in ``f``.

    Bounding the view keeps a damaged inner tar from running on into the next member of
    the outer tar.
    """

    def __init__(self, f: BinaryIO, start: int, size: int) -> None:
        super().__init__()
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(buf), self._size - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)


def open_nested(f: BinaryIO, member: tarfile.TarInfo) -> tarfile.TarFile:
    """Open the tar stored as ``member`` of the outer tar whose file is ``f``, in place.

    Member offsets of the returned tar are relative to ``member.offset_data``.  ``f``
    should be unbuffered for the same reason as in ``open_plain``.
    """
    return tarfile.open(fileobj=_Window(f, member.offset_data, member.size), mode="r:")  # type: ignore[arg-type]
