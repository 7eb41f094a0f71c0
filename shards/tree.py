"""The files of an extracted image tree as inventory entries: the tree walk and the labels.

Shared by the layouts that hold loose files (``shards.layouts`` (a), (b), (c));
``is_hidden`` and ``add_labelled`` also decide for the members of the raw tars (d).  Every
file found ends up in exactly one place: a ``Source`` of a known class, a ``Skip`` with the
reason it has none, or, for hidden files, ``Inventory.ignored``.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from shards.devkit import WNID_RE
from shards.sources import Inventory, Skip, Source

Label = tuple[str | None, str]  # (wnid, "") or (None, why the file has no class)
LabelOf = Callable[[tuple[str, ...], str], Label]  # (dir parts below the top, file name) -> label


def class_dirs(top: Path) -> list[str]:
    """Sorted wnid-shaped subdirectory names of ``top`` (empty classes count: indices must not shift)."""
    if not top.is_dir():
        return []
    with os.scandir(top) as entries:
        return sorted(e.name for e in entries if WNID_RE.fullmatch(e.name) and e.is_dir())


def walk(top: Path) -> Iterator[tuple[str, tuple[str, ...], list[str]]]:
    """(directory, its path parts below ``top``, sorted file names) for every directory."""
    chains = {os.fspath(top): frozenset({os.path.realpath(top)})}  # real paths of each dir's ancestors
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        chain = chains.pop(dirpath)
        # Following links keeps symlinked class dirs; only a link back to an ancestor is cut, as it would loop.
        subdirs = [(d, os.path.join(dirpath, d)) for d in sorted(dirnames)]
        reals = {sub: os.path.realpath(sub) for _, sub in subdirs}
        dirnames[:] = [d for d, sub in subdirs if reals[sub] not in chain]
        chains.update((sub, chain | {reals[sub]}) for d, sub in subdirs if d in dirnames)
        yield dirpath, Path(dirpath).relative_to(top).parts, sorted(filenames)


def is_hidden(parts: tuple[str, ...] | list[str]) -> bool:
    """Whether a path (as parts) is or lies inside a dot-file (``.DS_Store``, ``._x``, ``.git/``)."""
    return any(p.startswith(".") for p in parts)


def add_labelled(inv: Inventory, classes: set[str], split: str, path: str, label: Label, **where: int | str) -> None:
    """Record ``path`` as a source of its class, or as skipped when it has no known class."""
    wnid, reason = label
    if wnid is None:
        inv.skipped.append(Skip(path, reason, split))
    elif wnid not in classes:
        inv.skipped.append(Skip(path, f"unknown class {wnid}", split))
    else:
        inv.sources.append(Source(split, wnid, path, **where))  # type: ignore[arg-type]


def scan_tree(
    inv: Inventory,
    top: Path,
    split: str,
    label_of: LabelOf,
    skip_files: frozenset[str] = frozenset(),
) -> None:
    """Add every file under ``top``, labelled by ``label_of(dir parts below top, file name)``."""
    classes = set(inv.classes)
    inv.trees.append(str(top))
    for dirpath, rel, filenames in walk(top):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if is_hidden((*rel, name)):
                inv.ignored.append(path)
            elif path in skip_files:
                continue
            elif (size := file_size(path)) < 0:
                inv.skipped.append(Skip(path, "not a regular file (a fifo, device or socket): never read", split))
            else:
                add_labelled(inv, classes, split, path, label_of(rel, name), size=size)


def file_size(path: str) -> int:
    """The size of a loose file at the scan (0 when it cannot be stat'ed: the read says why;
    -1 when it is no regular file: a fifo's read waits for a writer for ever, and hung the run;
    a link to /dev/zero never ends).

    Why: the journal's fingerprint digests each source's path and size, so a file fixed in
    place after a run named it (a truncated JPEG copied again, as the skip report asks) changes
    the fingerprint.  Before, loose files all had size 0: a re-run kept the shards without it,
    kept its skip and failed the same way, or, on a finished directory, said "nothing to do".
    """
    try:
        st = os.stat(path)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else -1


def label_by_dir(rel: tuple[str, ...], name: str) -> Label:
    """The class of a file in ``<split>/<wnid>/``: its top directory.

    A ``<wnid>.tar`` beside the class folders is a class archive of ILSVRC2012_img_train.tar
    left packed, unless its folder is there too: then its class is missing from the class list
    (every index after it shifts, its val images are skipped as of an unknown class, and below
    ``max_skipped_fraction`` the run succeeds); the skip says so and what to do.
    """
    if not rel:
        stem = name.split(".", 1)[0]
        if WNID_RE.fullmatch(stem) and name != stem and ".tar" in name[len(stem):]:
            return None, (f"a class archive, not read: unless {stem}/ beside it holds its images, class {stem} is "
                          f"missing; extract it into {stem}/ and re-run")
        if name.startswith("ILSVRC2012_val_"):  # beside val's class folders: a valprep.sh cut short
            return None, ("a val image not sorted into its class folder: finish sorting val/ (valprep.sh), or move "
                          "the class folders' images back and give a label file (--val_labels)")
        return None, "not in a class directory"
    return (rel[0], "") if WNID_RE.fullmatch(rel[0]) else (None, "not a class directory")


def file_labeler(labels: dict[str, str], where: Path, classes: list[str]) -> LabelOf:
    """Label files of a flat val dir by name (or name without extension) from a label file."""

    def label_of(_rel: tuple[str, ...], name: str) -> Label:
        token = labels.get(name) or labels.get(os.path.splitext(name)[0])
        if token is None:
            return None, f"no label in {where}"
        if not token.isdigit():
            return token, ""
        index = int(token)  # Caffe's val.txt: 0-based position in the sorted wnids
        if index < len(classes):
            return classes[index], ""
        return None, f"label {index} in {where} names no class (there are {len(classes)})"

    return label_of


def add_unmatched(inv: Inventory, labels: dict[str, str], where: Path, top: Path) -> None:
    """A skip for each entry of a flat val's label file that no file under ``top`` answered.

    Why: a val download cut short (ImageNet's label files list all 50,000) left fewer val
    images with nothing said but a smaller count; these entries are inputs the label file
    promises, so they count as skipped, and past ``max_skipped_fraction`` the run fails.
    """
    found: set[str] = set()
    for entry in (*inv.sources, *inv.skipped):
        if entry.split == "val":
            name = os.path.basename(entry.path)
            found.update((name, os.path.splitext(name)[0]))
    for name in labels:
        if name not in found:
            inv.skipped.append(Skip(os.path.join(top, name), f"labelled in {where} but not found under {top}", "val"))
