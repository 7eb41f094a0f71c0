"""Turning a loader failure into a message that names the shard.

DALI stops the whole pipeline on the first sample it cannot read or decode (SPEC 6: it cannot
skip one), and its message names the tar for a read error but not for a decode error
(``nvImageCodec failure: '#3'``); for an index it cannot parse it names the ``.idx``, which is
then checked (``index_problem``) and named with the command that rewrites it.  Otherwise, when
the message names no shard, the shards of the split are checked against the manifest (present,
size, index, sha256) and the ones that changed since ``make shards`` wrote them are named.
Hashing reads the whole split (ImageNet's ~31 GB of shards: ~19 s of one core at the 1.6-1.8 GB/s
of docs/benchmarks.md "Shard check"), but only on this failure path, and the run is over anyway.

A shard that differs from the manifest is then read sample by sample (``damaged_samples``):
the manifest has one checksum per tar, not per sample, so a strict decode (Pillow, which
refuses what libjpeg only warns about) and a label check name the sample(s) to look at.
"""
from __future__ import annotations

import io
import json
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from pipeline.failures import changed_shards, dali_reason  # the tools' one-line failures: the same reading
from service.errors import DataError
from shards.index_check import INDEX, index_fix, index_problem
from shards.manifest import Manifest, Shard, remake

T = TypeVar("T")


def _sample_problem(components: dict[str, bytes], num_classes: int) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(components.get("jpg", b""))) as image:
            image.load()  # Pillow raises where libjpeg (and so DALI) only prints "Corrupt JPEG data"
    except Exception as exc:  # noqa: BLE001 (any decoder complaint is the answer)
        return f"the JPEG does not decode ({exc})"
    label = components.get("cls", b"").strip()
    if not label.isdigit() or int(label) >= num_classes:
        return f"label {label[:20]!r} is not a class index"
    return None


def _samples(tar: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of each sample, in tar order (its members are consecutive)."""
    key, components = None, {}
    with tarfile.open(tar, "r:") as archive:
        for member in archive:
            name, _, ext = member.name.partition(".")
            if name != key and key is not None:
                yield key, components
                components = {}
            key = name
            data = archive.extractfile(member) if member.isfile() else None
            components[ext] = data.read() if data else b""
    if key is not None:
        yield key, components


def damaged_samples(tar: Path, num_classes: int, limit: int = 3) -> str:
    """The samples of ``tar`` that fail a strict read, for a message: "sample KEY (source PATH):
    why; ..." or why none could be named."""
    found, count = [], 0
    try:
        for key, components in _samples(tar):
            problem = _sample_problem(components, num_classes)
            if problem:
                count += 1
                if len(found) < limit:
                    try:
                        source = json.loads(components.get("json", b"{}")).get("source")
                    except ValueError:
                        source = None
                    found.append(f"sample {key}{f' (source {source})' if source else ''}: {problem}")
    except (tarfile.TarError, OSError) as exc:
        found.append(f"the tar cannot be read past some member ({exc})")
    if not found:
        return ("no sample fails a strict decode: the damage is in pixel data that still decodes, "
                "a label that is still a class index, or the tar's headers or padding")
    return "; ".join(found) + (f" (and {count - limit} more)" if count > limit else "")


def diagnose(exc: BaseException, manifest: Manifest, split: str) -> DataError:
    """The ``DataError`` for a failure of the ``split`` loader, naming the shard when it can."""
    text = str(exc)
    reason = dali_reason(text)
    hint = f"re-create the shards ({remake(manifest.root)}) or restore them from a copy"
    shards = manifest.splits[split].shards
    if indexed := [s for s in shards if str(s.index) in text]:  # DALI names the index it cannot parse
        return _index_error(indexed[0], split, reason)
    named = [str(s.tar) for s in shards if str(s.tar) in text]
    if named:
        return DataError(f"{split} shard {named[0]} cannot be read ({reason}); {hint}")
    print(f"service: the {split} loader failed ({reason}); checking its {len(manifest.splits[split].shards)} "
          "shards against the manifest to find the bad one...", file=sys.stderr, flush=True)
    bad = changed_shards(manifest, split)
    if bad:
        (shard, problem), more = bad[0], f" (and {len(bad) - 1} more shard(s))" if len(bad) > 1 else ""
        if problem.startswith(INDEX):  # the tar is as written; its problem says how to rewrite the index
            return DataError(f"{split} shard {shard.tar}: {problem}{more}; the loader failed with: {reason}")
        samples = f"; {damaged_samples(shard.tar, manifest.num_classes)}" if shard.tar.is_file() else ""
        return DataError(f"{split} shard {shard.tar}: {problem}{samples}{more}; the loader failed with: {reason}; "
                         f"{hint}")
    return DataError(f"the {split} loader failed ({reason}) although every {split} shard in {manifest.root} "
                     "matches its manifest checksum: the data is as written; the failure is elsewhere "
                     "(memory, DALI, the decoder)")


def _index_error(shard: Shard, split: str, reason: str) -> DataError:
    """The loader failed on ``shard``'s DALI index: what the contract's check says of it, else DALI's
    own reason (an index can pass the cheap check and still be damaged inside); the tar is not at
    fault, so the fix is rewriting the index, not the shards."""
    problem = index_problem(shard, shard.tar.stat().st_size) if shard.tar.is_file() else None
    problem = problem or f"{INDEX} {shard.index} is damaged; {index_fix(shard)}"
    return DataError(f"{split} shard {shard.tar}: {problem}; the loader failed with: {reason}")


def guarded(batches: Iterable[T], on_error: Callable[[BaseException], DataError]) -> Iterator[T]:
    """Yield from ``batches``; an exception raised by the loader itself (not by the code consuming
    the batches) becomes ``on_error(exc)``."""
    try:
        yield from batches
    except Exception as exc:
        raise on_error(exc) from None
