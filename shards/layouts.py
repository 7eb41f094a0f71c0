"""Detect which ImageNet layout a directory holds and enumerate every input image.

``scan(root)`` tries these layouts in this order and uses the first whose expected paths
(relative to ``root``) all exist:

(a) ``train/<wnid>/*`` + ``val/<wnid>/*``: extracted, val sorted into class dirs (valprep.sh).
(b) ``train/<wnid>/*`` + a flat ``val/*`` + a label file: the ``val_labels`` argument, else
    the first of ``VAL_LABEL_NAMES`` found in ``root`` or ``val/``.  Each line is
    ``<filename> <label>`` (whitespace or comma separated); the label is a wnid or a decimal
    integer, which is Caffe's ``val.txt`` convention: a 0-based index into the sorted train
    wnids (so it only means the right class when train holds all 1000 classes).
(c) Kaggle: ``ILSVRC/Data/CLS-LOC/train/<wnid>/*``, a flat ``ILSVRC/Data/CLS-LOC/val/*``,
    ``LOC_val_solution.csv`` and ``LOC_synset_mapping.txt``; ``test/`` is ignored.
(d) Raw tars: ``ILSVRC2012_img_train.tar`` (one inner ``<wnid>.tar`` per class),
    ``ILSVRC2012_img_val.tar`` and the devkit (``ILSVRC2012_devkit_t12/`` or its ``.tar.gz``),
    whose ground truth gives the ILSVRC2012_ID of ``ILSVRC2012_val_<k>`` on line k and whose
    ``meta.mat`` maps IDs to wnids.  Tars are read in place, never extracted.

Rules for every layout: classes are the sorted wnids (``n`` + 8 digits) of the train split
and a class index is a position in that list.  Every file found is accounted for: a
``Source``; a ``Skip`` with a reason (outside a class directory, unknown class, no label,
unsafe tar member); or, for hidden files (``.DS_Store``, ``._x.JPEG``), ``Inventory.ignored``.
"""
from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from common.config import ConfigError
from shards import tarsafe
from shards.devkit import (
    DEVKIT_ARCHIVE, DEVKIT_DIR, WNID_RE, LabelFileError, find_devkit, load_devkit,
    read_kaggle_solution, read_synset_names, read_val_labels,
)
from shards.sources import Inventory, Skip, Source
from shards.tree import (
    add_labelled, add_unmatched, class_dirs, file_labeler, is_hidden, label_by_dir, scan_tree,
)

VAL_LABEL_NAMES = ("val_labels.txt", "val_labels.csv", "val.txt")  # layout (b), in root or val/
NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")  # optional class names for (a), (b)
KAGGLE = Path("ILSVRC", "Data", "CLS-LOC")
KAGGLE_SOLUTION, KAGGLE_NAMES = "LOC_val_solution.csv", "LOC_synset_mapping.txt"
TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"

Probe = list[tuple[str, bool]]  # (an expected path, whether it is there)


class LayoutError(ValueError):
    """No supported layout under the root, or the metadata of the one found is unusable."""


class ValLabelsError(LayoutError, ConfigError):
    """``val_labels`` names no file, or a tree whose val images are not labelled by a file: the
    setting's problem (``make shards`` exits 2 on a ``ConfigError``), not the source tree's."""


@dataclass(frozen=True)
class _Layout:
    name: str
    probe: Callable[[Path, Path | None], Probe]
    scan: Callable[[Path, Path | None], Inventory]


def scan(root: Path | str, val_labels: Path | None = None) -> Inventory:
    """Detect the layout under ``root`` and list every input image in it.

    ``val_labels`` names layout (b)'s label file when it is not at one of the documented
    places.  Raises ``LayoutError`` listing every layout and the paths it expects when none
    matches, or naming the file and line of malformed label metadata; ``ValLabelsError`` (a
    setting's problem) when ``val_labels`` is given for another layout, or names no file.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise LayoutError(f"{root}: {'not a directory' if root.exists() else 'no such directory'}: --src (SRC=) "
                          "must name the directory that holds ImageNet (train/ and val/, or its tars)")
    report = []
    for layout in LAYOUTS:
        probe = layout.probe(root, val_labels)
        if all(ok for _, ok in probe):
            if val_labels is not None and layout is not LAYOUTS[1]:
                raise ValLabelsError(f"val_labels {val_labels}: a label file only applies to layout (b) (a flat val/), "
                                     f"but {root} holds layout {layout.name}, labelled by its own metadata: "
                                     "drop --val_labels")
            try:
                inv = layout.scan(root, val_labels)
            except (LabelFileError, tarfile.TarError, OSError) as e:
                raise LayoutError(f"{layout.name} under {root}: {e}") from e
            for entries in (inv.sources, inv.skipped):
                entries.sort(key=lambda e: (e.split, e.path))
            inv.ignored.sort()
            return inv
        report.append(f"{layout.name}: " + ", ".join(f"{what} [{'found' if ok else 'MISSING'}]" for what, ok in probe))
    if val_labels is not None and not Path(val_labels).is_file():  # layout (b) but for the file the setting names
        raise ValLabelsError(f"val_labels {val_labels}: no such file: give the flat val/ directory's label file "
                             "(<file> <wnid or class index> per line)")
    looked_for = "\n  ".join(report)
    raise LayoutError(f"no ImageNet layout found under {root}; looked for (paths relative to it):\n  {looked_for}")


# ---- shared by the extracted layouts (a), (b), (c); their tree walk is shards.tree ----

def _extracted(layout: str, root: Path, train: Path, names_file: Path | None) -> Inventory:
    """An inventory with the train split of an extracted ``train/<wnid>/`` tree and class names."""
    inv = Inventory(layout=layout, root=str(root), classes=class_dirs(train))
    scan_tree(inv, train, "train", label_by_dir)
    if names_file is not None:
        names = read_synset_names(names_file)
        inv.names = {w: names[w] for w in inv.classes if w in names}
    return inv


def _names_file(root: Path) -> Path | None:
    """The optional ``<wnid> <name>`` file of layouts (a) and (b), if present."""
    return next((root / n for n in NAME_FILES if (root / n).is_file()), None)


def _find_val_labels(root: Path, explicit: Path | None) -> Path | None:
    """Layout (b)'s label file: ``explicit`` if given, else the first documented name present."""
    if explicit is not None:
        return Path(os.path.abspath(explicit)) if Path(explicit).is_file() else None
    return next((d / n for d in (root, root / "val") for n in VAL_LABEL_NAMES if (d / n).is_file()), None)


# ---- the layouts ---------------------------------------------------------------------

def _probe_a(root: Path, _labels: Path | None) -> Probe:
    return [("train/<wnid>/", bool(class_dirs(root / "train"))), ("val/<wnid>/", bool(class_dirs(root / "val")))]


def _scan_a(root: Path, _labels: Path | None) -> Inventory:
    inv = _extracted(LAYOUTS[0].name, root, root / "train", _names_file(root))
    scan_tree(inv, root / "val", "val", label_by_dir)
    return inv


def _probe_b(root: Path, labels: Path | None) -> Probe:
    wanted = str(labels) if labels is not None else " or ".join(f"{{.,val}}/{n}" for n in VAL_LABEL_NAMES)
    return [
        ("train/<wnid>/", bool(class_dirs(root / "train"))),
        ("val/", (root / "val").is_dir()),
        (f"label file {wanted}", _find_val_labels(root, labels) is not None),
    ]


def _scan_b(root: Path, labels: Path | None) -> Inventory:
    label_file = _find_val_labels(root, labels)
    assert label_file is not None  # the probe found it
    inv = _extracted(f"{LAYOUTS[1].name} labelled by {label_file}", root, root / "train", _names_file(root))
    labels = read_val_labels(label_file)
    _check_indices(labels, label_file, inv.classes)
    scan_tree(inv, root / "val", "val", file_labeler(labels, label_file, inv.classes),
              skip_files=frozenset({str(label_file)}))
    add_unmatched(inv, labels, label_file, root / "val")
    return inv


def _check_indices(labels: dict[str, str], label_file: Path, classes: list[str]) -> None:
    """Refuse class-index labels counting more classes than train/ holds.  Why: an index is a
    position in the full sorted class list, so with one class folder missing (a failed
    extraction) every label after it named the next class, silently; only the last index was
    out of range, and skipped as one bad file."""
    top = max((int(t) for t in labels.values() if t.isdigit()), default=-1)
    if top >= len(classes):
        raise LayoutError(f"{label_file}: class index {top} but train/ holds {len(classes)} classes: an index counts "
                          "the full sorted class list, so with a class folder missing every later label would name "
                          "the wrong class; restore the missing class folder(s) or label val by wnid")


def _probe_c(root: Path, _labels: Path | None) -> Probe:
    return [
        (f"{KAGGLE.as_posix()}/train/<wnid>/", bool(class_dirs(root / KAGGLE / "train"))),
        (f"{KAGGLE.as_posix()}/val/", (root / KAGGLE / "val").is_dir()),
        (KAGGLE_SOLUTION, (root / KAGGLE_SOLUTION).is_file()),
        (KAGGLE_NAMES, (root / KAGGLE_NAMES).is_file()),
    ]


def _scan_c(root: Path, _labels: Path | None) -> Inventory:
    inv = _extracted(LAYOUTS[2].name, root, root / KAGGLE / "train", root / KAGGLE_NAMES)
    solution, labels = root / KAGGLE_SOLUTION, read_kaggle_solution(root / KAGGLE_SOLUTION)
    scan_tree(inv, root / KAGGLE / "val", "val", file_labeler(labels, solution, inv.classes))
    add_unmatched(inv, labels, solution, root / KAGGLE / "val")
    return inv


def _probe_d(root: Path, _labels: Path | None) -> Probe:
    return [
        (TRAIN_TAR, (root / TRAIN_TAR).is_file()),
        (VAL_TAR, (root / VAL_TAR).is_file()),
        (f"{DEVKIT_DIR}/ or {DEVKIT_ARCHIVE}", find_devkit(root) is not None),
    ]


def _scan_d(root: Path, _labels: Path | None) -> Inventory:
    devkit_path = find_devkit(root)
    assert devkit_path is not None  # the probe found it
    devkit = load_devkit(devkit_path)
    inv = Inventory(layout=LAYOUTS[3].name, root=str(root), classes=[])
    train, val = str(root / TRAIN_TAR), str(root / VAL_TAR)
    classes: set[str] = set()
    with tarsafe.open_plain(train) as outer, open(train, "rb", buffering=0) as raw:
        for info, path, _ in _tar_files(inv, outer, train, "train", base=0):
            wnid = PurePosixPath(info.name).name.removesuffix(".tar")
            if not (info.name.endswith(".tar") and WNID_RE.fullmatch(wnid)):
                inv.skipped.append(Skip(path, "not a per-class <wnid>.tar", "train"))
                continue
            classes.add(wnid)
            _scan_inner_tar(inv, raw, info, path, wnid, train)
    inv.classes = sorted(classes)
    inv.names = {w: devkit.names[w] for w in inv.classes if w in devkit.names}
    with tarsafe.open_plain(val) as tar:
        for info, path, offset in _tar_files(inv, tar, val, "val", base=0):
            label = devkit.label(PurePosixPath(info.name).name)
            add_labelled(inv, classes, "val", path, label, tar=val, offset=offset, size=info.size)
    return inv


def _tar_files(
    inv: Inventory, tar: tarfile.TarFile, prefix: str, split: str, base: int
) -> Iterator[tuple[tarfile.TarInfo, str, int]]:
    """(header, report path, absolute data offset) of each safe, visible regular file in ``tar``.

    Unsafe members become skips and hidden ones ``ignored``; directories are only structure.
    ``base`` is the offset of ``tar`` itself in the outermost file.
    """
    for info in tar:
        if info.isdir():
            continue
        path = f"{prefix}:{info.name}"
        reason = tarsafe.unsafe_reason(info)
        if reason is not None:
            inv.skipped.append(Skip(path, reason, split))
        elif is_hidden(PurePosixPath(info.name).parts):
            inv.ignored.append(path)
        else:
            yield info, path, base + info.offset_data


def _scan_inner_tar(inv: Inventory, raw: BinaryIO, info: tarfile.TarInfo, path: str, wnid: str, outer: str) -> None:
    """Add the images of one per-class inner tar, located by byte range in the outer tar."""
    try:
        with tarsafe.open_nested(raw, info) as inner:
            for member, member_path, offset in _tar_files(inv, inner, path, "train", base=info.offset_data):
                inv.sources.append(Source("train", wnid, member_path, tar=outer, offset=offset, size=member.size))
    except tarfile.TarError as e:
        # Members listed before the damage stay usable; the skip says the rest are missing.
        inv.skipped.append(Skip(path, f"unreadable inner tar, members after the damage not listed ({e})", "train"))


LAYOUTS = (
    _Layout("(a) train/<wnid>/ + val/<wnid>/", _probe_a, _scan_a),
    _Layout("(b) train/<wnid>/ + flat val/", _probe_b, _scan_b),
    _Layout("(c) Kaggle ILSVRC/Data/CLS-LOC", _probe_c, _scan_c),
    _Layout("(d) raw ILSVRC2012_img_{train,val}.tar + devkit", _probe_d, _scan_d),
)
