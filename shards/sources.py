"""What the sharder reads: one ``Source`` per input image, wherever it lives.

A layout scanner (``shards.layouts``) turns an ImageNet tree into an ``Inventory``: the
class list plus one ``Source`` per image file.  A source is either a plain file or a byte
range inside a tar archive (the raw ``ILSVRC2012_img_*.tar`` files are read in place, never
extracted), so the workers that decode images only need ``read_bytes``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Source:
    """One input image.

    ``path`` is what a person reads in reports: a file path, or for tar members
    ``outer.tar:inner.tar:member`` (or ``outer.tar:member``).  ``tar``/``offset``/``size``
    locate the bytes of a tar member inside the outermost tar file on disk; a loose file's
    ``size`` is its size at the scan (in the resume fingerprint; the whole file is read).

    Slotted: ImageNet has 1.33M of these in the parent; without a ``__dict__`` an entry is
    ~190 bytes instead of ~240 (tracemalloc, ImageNet-length paths), most of it the path.
    """

    split: str  # "train" or "val"
    wnid: str  # the class's WordNet id, always one of Inventory.classes
    path: str
    tar: str | None = None
    offset: int = 0
    size: int = 0


@dataclass(frozen=True, slots=True)
class Skip:
    """An input accounted for but not written, with the reason a person can act on."""

    path: str
    reason: str
    split: str = ""


@dataclass
class Inventory:
    """Everything a layout scanner found under one root."""

    layout: str  # human-readable layout name, e.g. "(a) train/<wnid>/ + val/<wnid>/"
    root: str
    classes: list[str]  # sorted wnids; class index = position in this list
    names: dict[str, str] = field(default_factory=dict)  # wnid -> human name, where known
    sources: list[Source] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)  # found but unusable (unknown class, unsafe tar member...)
    ignored: list[str] = field(default_factory=list)  # hidden files (.DS_Store, ._*): not images, not counted
    trees: list[str] = field(default_factory=list)  # directories walked for loose files (--out must stay out)


# Far past any photo (ImageNet's largest file is a few tens of MB; 200 Mpx, the pixel cap of
# ``shards.imaging``, as a bare 24-bit BMP is 600 MB).  Read whole, a bigger file (a video or a disk
# image dropped among the images) could take a worker's memory and stop every re-run on it.
MAX_INPUT_BYTES = 1 << 30


class TooLarge(OSError):
    """An input over ``MAX_INPUT_BYTES``: never read."""


def read_bytes(source: Source) -> bytes:
    """The encoded bytes of ``source``, from its file or from its byte range in a tar
    (``TooLarge`` past ``MAX_INPUT_BYTES``, before any is read)."""
    if source.tar is None:
        with open(source.path, "rb") as f:
            _check_size(os.fstat(f.fileno()).st_size)
            return f.read()
    _check_size(source.size)
    with open(source.tar, "rb") as f:
        f.seek(source.offset)
        data = f.read(source.size)
    if len(data) != source.size:
        raise OSError(f"{source.path}: tar member is truncated ({len(data)} of {source.size} bytes)")
    return data


def _check_size(size: int) -> None:
    if size > MAX_INPUT_BYTES:
        raise TooLarge(f"{size / 2**30:.1f} GiB, too large to be a photo (the limit is {MAX_INPUT_BYTES >> 30} GiB); "
                       "remove it from the image folders")
