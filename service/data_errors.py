"""Turning a loader failure into a message that names the shard.

DALI stops the whole pipeline on the first sample it cannot read or decode (SPEC 6: it cannot
skip one), and its message names the tar for a read error but not for a decode error
(``nvImageCodec failure: '#3'``).  So, when the message names no shard, the shards of the split
are checked against the manifest (present, size, sha256) and the ones that changed since
``make shards`` wrote them are named.  Hashing reads the whole split (minutes on ImageNet), but
only on this failure path, and the run is over anyway.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from service.errors import DataError
from shards.manifest import Manifest

T = TypeVar("T")
_NOISE = ("Current pipeline object is no longer valid", "C++ context", "Critical error in pipeline")


def dali_reason(text: str) -> str:
    """The informative line of a DALI error (what follows "encountered:"), else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    useful = [ln for ln in lines if not ln.startswith(_NOISE)]
    return (useful or lines or [text])[0]


def changed_shards(manifest: Manifest, split: str) -> list[str]:
    """Shards of ``split`` that differ from the manifest: 'path: why' for each."""
    from shards.tarwriter import sha256_file

    bad = []
    for shard in manifest.splits[split].shards:
        if not shard.tar.is_file():
            bad.append(f"{shard.tar}: missing")
        elif shard.tar.stat().st_size != shard.bytes:
            bad.append(f"{shard.tar}: {shard.tar.stat().st_size} bytes, the manifest says {shard.bytes} (truncated?)")
        elif sha256_file(shard.tar) != shard.sha256:
            bad.append(f"{shard.tar}: contents differ from the manifest's sha256 (corrupt)")
    return bad


def diagnose(exc: BaseException, manifest: Manifest, split: str) -> DataError:
    """The ``DataError`` for a failure of the ``split`` loader, naming the shard when it can."""
    text = str(exc)
    reason = dali_reason(text)
    hint = f"re-create the shards (make shards SRC=<imagenet> OUT={manifest.root}) or restore them from a copy"
    named = [str(s.tar) for s in manifest.splits[split].shards if str(s.tar) in text]
    if named:
        return DataError(f"{split} shard {named[0]} cannot be read ({reason}); {hint}")
    print(f"service: the {split} loader failed ({reason}); checking its {len(manifest.splits[split].shards)} "
          "shards against the manifest to find the bad one...", file=sys.stderr, flush=True)
    bad = changed_shards(manifest, split)
    if bad:
        return DataError(f"{split} shard {bad[0]}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; "
                         f"the loader failed with: {reason}; {hint}")
    return DataError(f"the {split} loader failed ({reason}) although every {split} shard in {manifest.root} "
                     "matches its manifest checksum: the data is as written; the failure is elsewhere "
                     "(memory, DALI, the decoder)")


def guarded(batches: Iterable[T], on_error: Callable[[BaseException], DataError]) -> Iterator[T]:
    """Yield from ``batches``; an exception raised by the loader itself (not by the code consuming
    the batches) becomes ``on_error(exc)``."""
    try:
        yield from batches
    except Exception as exc:
        raise on_error(exc) from None
