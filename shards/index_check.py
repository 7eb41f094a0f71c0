"""A shard's DALI index against its tar and the manifest: the checks, and how to fix what they find.

DALI trusts an index blindly, so every reader checks it first (``index_problem``: its header and
last entry) and the deep check reads every entry (``index_entries_defect``).  The manifest's
shard check (``shards.manifest.shard_problem``) runs these; a problem of an index starts with
``INDEX`` because its fix is ``wds2idx`` (``index_fix``), not ``make shards``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a Shard is the manifest's; the manifest imports these checks
    from shards.manifest import Shard

INDEX = "its index"  # how every problem of a shard's DALI index begins: its fix is wds2idx, not make shards


def index_fix(shard: Shard) -> str:
    """How to rewrite a shard's index from its tar: DALI's ``wds2idx`` (installed with DALI, next to
    the environment's python) writes the very bytes ``make shards`` wrote (tests/test_shards_output.py),
    in a second; so does re-running ``make shards`` with the same sources and settings (it rewrites
    every index that does not fit its tar, ``shards.build.unchanged``)."""
    return f"rewrite it from the tar: wds2idx {shard.tar} {shard.index}"


def _entry_end(line: bytes, members: int) -> int | None:
    """The end (offset + size) of the furthest member of an index line ``<ext> <offset> <size>
    <name>`` x ``members``; None when it is not such a line (cut short, say)."""
    fields = line.split()
    groups = [fields[i:i + 4] for i in range(0, len(fields), 4)]
    if len(fields) != 4 * members or not all(name.endswith(b"." + ext) and offset.isdigit() and size.isdigit()
                                             for ext, offset, size, name in groups):
        return None
    return max(int(offset) + int(size) for _, offset, size, _ in groups)


def index_problem(shard: Shard, tar_bytes: int, entries: bool = False) -> str | None:
    """What is wrong with ``shard``'s DALI index, and how to fix it, in one line (None: nothing seen);
    ``entries``: every entry too (``index_entries_defect``), from the same read."""
    what = index_defect(shard, tar_bytes, entries)
    return None if what is None else f"{INDEX} {shard.index} {what}; {index_fix(shard)}"


def index_defect(shard: Shard, tar_bytes: int, entries: bool = False) -> str | None:
    """What is wrong with ``shard``'s DALI index against the manifest ("is empty"...; None: nothing seen);
    ``entries``: each entry too (``index_entries_defect``), on the lines read here.

    DALI trusts the index blindly: a stale one (of an older or another tar) with fewer entries
    makes the reader skip the other samples without a word, one with more reads garbage.  So its
    header, its entry count and its last entry's end are checked against the manifest's sample
    count and the tar's size.  Read whole: a line per sample (~100 MB for ImageNet's train split,
    a fraction of a second), against the ~31 GB of tars the hash reads; not a per-entry check."""
    try:
        lines = [ln for ln in shard.index.read_bytes().splitlines() if ln.strip()]
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    head = lines[0].split() if lines else []
    count = len(lines) - 1
    if len(head) != 2 or head[0] != b"v1.2" or not head[1].isdigit():
        return "is empty" if not lines else "does not begin with the `v1.2 <samples>` line of DALI's format"
    if int(head[1]) != shard.samples or count != shard.samples:
        return (f"lists {int(head[1])} sample(s) in its header and has {count} entries where the manifest "
                f"has {shard.samples} (stale: of another tar, or truncated)")
    if not count:
        return None  # a shard of no samples (the manifest's count says so)
    if (end := _entry_end(lines[-1], len(lines[1].split()) // 4)) is None:  # members as in the first sample
        return "ends in a malformed entry (truncated?)"
    if end > tar_bytes:
        return f"points to byte {end}, past the end of the tar ({tar_bytes} bytes): it is of another tar"
    return _entries_defect(lines[1:]) if entries else None


def index_entries_defect(index: Path) -> str | None:
    """What is wrong with any entry of ``index`` (None: nothing): each member must sit right behind
    its own 512-byte header at the end of the previous member's data rounded up to 512 bytes, as
    ``make shards`` writes them (plain ustar members) and ``wds2idx`` indexes them.  ``index_defect``
    reads only the header and the last entry: a damaged offset or size inside made DALI read one
    sample's JPEG as another's, or a JPEG cut short, under the right label and checksums.  Parsing
    every entry costs ~3 s for ImageNet's 1.28M samples, so this is part of the deep check
    (``shard_problem``: a few ms per shard, beside its hash), not of every start's."""
    try:
        return _entries_defect([ln for ln in index.read_bytes().splitlines()[1:] if ln.strip()])
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"


def _entries_defect(lines: list[bytes]) -> str | None:
    """``index_entries_defect`` on an index's entry lines (its header left out)."""
    samples = [ln.split() for ln in lines]
    expected = 512  # the first member's data, behind the tar's first header
    for number, fields in enumerate(samples, 1):
        if not fields or len(fields) % 4:
            return f"has a malformed entry {number}"
        for i in range(0, len(fields), 4):
            offset, size = (int(f) if f.isdigit() else -1 for f in fields[i + 1:i + 3])
            if offset != expected or size < 0:
                return (f"has entry {number} pointing where the tar has no such member (byte {offset}, "
                        f"expected {expected})")
            expected = -(-(offset + size) // 512) * 512 + 512
    return None
