"""The shard directory contract: ``manifest.json`` and the checks every reader runs first.

Layout of a shard directory::

    manifest.json            this file's record (format, parameters, classes, splits, accounting)
    stats.json, mean_image.npy   dataset statistics (see shards.stats)
    train/train-NNNNNN.tar   WebDataset shards: <key>.jpg, <key>.cls (class index, ASCII),
    train/train-NNNNNN.idx   <key>.json ({"wnid", "source"}); DALI index next to every tar
    val/val-NNNNNN.{tar,idx}

``load`` validates the record and that every listed file is there with the recorded size
(``deep=True`` also re-hashes them), and fails early with a hint on how to fix it.  It is three
steps a reader can also take apart, so that nothing is read twice: ``read`` (the record alone,
no listed file looked at), ``check`` (the splits asked for and their statistics are there) and
``check_files`` (the shards of those splits).  The training service reads the record once
before anything else and checks the rest later, each shard's files once (``service.app``).
A shard's DALI index is checked by ``shards.index_check``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from shards.index_check import INDEX, index_fix, index_problem

FORMAT = "alexnet2012-webdataset"
VERSION = 1
SPLITS = ("train", "val")


class ManifestError(ValueError):
    """The shard directory does not satisfy the contract; the message says what to do."""


@dataclass(frozen=True)
class Shard:
    """One tar of a split, with absolute paths."""

    tar: Path
    index: Path
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Split:
    """One split: its shards and how many samples of each class it holds."""

    name: str
    samples: int
    class_counts: tuple[int, ...]  # by class index
    shards: tuple[Shard, ...]


@dataclass(frozen=True)
class Manifest:
    """The parts of ``manifest.json`` that readers need."""

    root: Path
    classes: tuple[str, ...]  # sorted wnids; class index = position
    names: tuple[str, ...]
    splits: dict[str, Split]
    image_size: int
    quality: int  # the JPEG quality the images were stored at (predict prepares images the same way)
    stats_path: Path
    record: dict

    @property
    def num_classes(self) -> int:
        """Number of classes (the model's output width)."""
        return len(self.classes)


def remake(root: Path) -> str:
    """The command that (re)writes the shards at ``root``: the one every "re-create" advice names."""
    return f"make shards SRC=<imagenet> OUT={root}"


def _hint(root: Path) -> str:
    return f"(re)create it with `{remake(root)}`"


def _not_shards(root: Path) -> str:
    """Why ``root`` is no shard directory, and what to do: the images themselves (a layout
    ``make shards`` reads: split folders of class folders) are to be sharded into another
    directory, not into themselves."""
    if root.exists() and not root.is_dir():
        return f"{root} is a file, not a shard directory (the folder make shards wrote, with manifest.json)"
    if not root.is_dir():
        return f"{root} does not exist; {_hint(root)}"
    if any(p.is_dir() for split in ("train", "val") if (root / split).is_dir() for p in (root / split).iterdir()):
        return (f"{root} holds images (train/<class>/...), not shards: shard them first, "
                f"`make shards SRC={root} OUT=<a new directory>`, and train on that directory")
    return f"{root / 'manifest.json'} not found: {root} is not a finished shard directory; {_hint(root)}"


def rerun_hint(root: Path) -> str:
    """For the files ``make shards`` writes last (the statistics, the manifest): a re-run keeps
    the shards it finished (its journal) and writes them again."""
    return (f"re-run the sharding, `{remake(root)}`: it keeps the shards already written "
            "and writes the statistics and the manifest again")


def _split(root: Path, name: str, entry: dict, num_classes: int) -> Split:
    shards = tuple(
        Shard(root / name / s["tar"], root / name / s["index"], int(s["samples"]), int(s["bytes"]), s["sha256"])
        for s in entry["shards"]
    )
    counts = tuple(int(c) for c in entry["class_counts"])
    if len(counts) != num_classes or sum(counts) != entry["samples"] or sum(s.samples for s in shards) != entry["samples"]:
        raise ManifestError(f"{root / 'manifest.json'}: split {name!r} counts do not add up; {_hint(root)}")
    return Split(name, int(entry["samples"]), counts, shards)


CORRUPT = "contents differ from the manifest's sha256 (corrupt)"
UNREADABLE = "the tar cannot be read"


def shard_problem(shard: Shard, deep: bool = True, stop: Callable[[], bool] | None = None,
                  index: bool = True, entries: bool | None = None) -> str | None:
    """What is wrong with ``shard`` against the manifest (None: it matches): missing tar or
    index, another size, an index that does not fit the tar (``index_problem``, unless ``index``
    is False: a caller that has just checked it), an index entry that does not fit the tar
    (``entries``, default ``deep``: ``index_entries_defect``, from the same read of the index), or
    (``deep``) other contents.  The one place that decides whether a shard is still the one
    ``make shards`` wrote.  ``stop``: see ``sha256_file`` (``HashStopped``)."""
    from shards.tarwriter import sha256_file  # late import: readers rarely need hashing

    if not shard.tar.is_file():
        return "missing (the manifest lists it)"
    if not shard.index.is_file():
        return f"{INDEX} {shard.index} is missing; {index_fix(shard)}"
    size = shard.tar.stat().st_size
    if size != shard.bytes:
        return f"{size} bytes, the manifest says {shard.bytes} (truncated or modified)"
    if index and (problem := index_problem(shard, size, deep if entries is None else entries)):
        return problem
    try:
        if deep and sha256_file(shard.tar, stop) != shard.sha256:
            return CORRUPT
    except OSError as exc:  # another user's file (mode 600), a failing disk: was a traceback
        return (f"{UNREADABLE} ({exc.strerror or exc}) by uid {os.getuid()}: give that user read "
                "access to the shards (a failing disk: restore the shard from a copy)")
    return None


def fix_in_text(problem: str) -> bool:
    """Whether ``problem`` says its own fix (a DALI index to rewrite, a file that cannot be read)
    rather than needing the shards restored or re-created."""
    return problem.startswith((INDEX, UNREADABLE))


def check_files(m: Manifest, splits: tuple[str, ...] = SPLITS, deep: bool = False,
                exclude: Collection[str] = ()) -> None:
    """Every shard of ``splits`` but the tars named in ``exclude`` against ``m`` (``shard_problem``:
    its index is read whole); the first problem is a ``ManifestError`` naming the shard and the fix."""
    for name in splits:
        for shard in m.splits[name].shards:
            problem = None if shard.tar.name in exclude else shard_problem(shard, deep)
            if problem:
                fix = "" if fix_in_text(problem) else f"; {_hint(m.root)}"
                raise ManifestError(f"{shard.tar}: {problem}{fix}")


def _read(path: Path, root: Path) -> dict:
    """The JSON object of ``manifest.json``; one that cannot be read, is not UTF-8 JSON or not an
    object is a ``ManifestError`` naming the file and what to do (no traceback: the reader's
    entry points turn it into one line)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ManifestError(f"{path} cannot be read ({exc.strerror or exc}): make it readable for uid "
                            f"{os.getuid()}") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path} is not UTF-8 text (byte {exc.start}); {_hint(root)}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); {_hint(root)}") from None
    if not isinstance(record, dict):
        raise ManifestError(f"{path} is JSON but not an object; {_hint(root)}")
    return record


def _manifest(root: Path, record: dict) -> Manifest:
    """The record's parts as a ``Manifest``; a missing key is a ``KeyError`` naming it."""
    classes = tuple(c["wnid"] for c in record["classes"])
    return Manifest(
        root=root,
        classes=classes,
        names=tuple(c.get("name") or c["wnid"] for c in record["classes"]),
        splits={n: _split(root, n, e, len(classes)) for n, e in record["splits"].items()},
        image_size=int(record["parameters"]["size"]),
        quality=int(record["parameters"]["quality"]),
        stats_path=root / record["stats"],
        record=record,
    )


def read(root: Path | str) -> Manifest:
    """Read ``root/manifest.json`` and check its record (format, keys, counts), no listed file
    looked at; raises ``ManifestError`` naming the problem and the fix (a ``root`` that is no shard
    directory at all: what it is, ``_not_shards``).  The file is read once: ``check`` and
    ``check_files`` judge the rest on what was read."""
    root = Path(root).resolve()
    path = root / "manifest.json"
    if not path.is_file():
        raise ManifestError(_not_shards(root))
    record = _read(path, root)
    if record.get("format") != FORMAT or record.get("format_version") != VERSION:
        raise ManifestError(f"{path}: format {record.get('format')!r} version {record.get('format_version')!r}, "
                            f"this code reads {FORMAT!r} version {VERSION}; {_hint(root)}")
    try:
        return _manifest(root, record)
    except ManifestError:  # a ValueError too, already saying what is wrong
        raise
    except KeyError as exc:  # the key's name is all a KeyError says
        raise ManifestError(f"{path} lacks the required key {exc.args[0]!r}; {_hint(root)}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{path} has a value of the wrong kind ({exc}); {_hint(root)}") from None


def check(m: Manifest, splits: tuple[str, ...] = SPLITS) -> None:
    """The record ``read`` has ``splits`` and, for ``train`` (whose statistics every split uses),
    the statistics file; else a ``ManifestError`` naming what is missing and the fix."""
    missing = [s for s in splits if s not in m.splits]
    if missing:
        raise ManifestError(f"{m.root / 'manifest.json'} has no split(s) {missing}; {_hint(m.root)}")
    if "train" in splits and not m.stats_path.is_file():
        raise ManifestError(f"{m.stats_path} not found (dataset statistics); {_hint(m.root)}")


def load(root: Path | str, splits: tuple[str, ...] = SPLITS, deep: bool = False,
         exclude: Collection[str] = ()) -> Manifest:
    """Read and check ``root/manifest.json`` and the files of ``splits`` but the tars named in
    ``exclude`` (left out by the reader); raises ``ManifestError`` naming the problem and the fix."""
    m = read(root)
    check(m, splits)
    check_files(m, splits, deep, exclude)
    return m
