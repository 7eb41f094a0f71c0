"""Readers for ImageNet's label metadata: the devkit, Kaggle's CSV, val label files, names.

Each reader parses one file into plain dicts and knows nothing about directory trees; a
malformed file raises ``LabelFileError`` naming the file and line, because a silently
misparsed label file gives chance-level validation accuracy.
"""
from __future__ import annotations

import csv
import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

WNID_RE = re.compile(r"n\d{8}")
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
_VAL_NAME_RE = re.compile(r"ILSVRC2012_val_(\d+)(\.[^.]*)?")


class LabelFileError(ValueError):
    """A label or metadata file that cannot be parsed; the message names file and line."""


def _lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank, non-comment lines of a text file, with their 1-based line numbers."""
    text = path.read_text(encoding="utf-8-sig")
    return [(n, s.strip()) for n, s in enumerate(text.splitlines(), 1) if s.strip() and not s.lstrip().startswith("#")]


def read_val_labels(path: Path) -> dict[str, str]:
    """Filename -> label token from a ``<filename> <label>`` file (layout b).

    Fields are separated by whitespace or a comma.  The label is a wnid, or a decimal
    integer: Caffe's ``val.txt`` convention, a 0-based class index into the sorted wnids.
    Anything else, a header line included, raises ``LabelFileError``.
    """
    labels: dict[str, str] = {}
    for n, line in _lines(path):
        tokens = re.split(r"[\s,]+", line)
        if len(tokens) != 2 or not (WNID_RE.fullmatch(tokens[1]) or tokens[1].isdigit()):
            raise LabelFileError(f"{path}:{n}: expected '<filename> <wnid or class index>', got {line!r}")
        name, label = tokens
        if labels.setdefault(name, label) != label:
            raise LabelFileError(f"{path}:{n}: {name} labelled {label} here but {labels[name]} earlier")
    return labels


def read_kaggle_solution(path: Path) -> dict[str, str]:
    """ImageId -> wnid from Kaggle's ``LOC_val_solution.csv``.

    The header is ``ImageId,PredictionString``; a prediction string is repeated
    ``<wnid> x0 y0 x1 y1`` boxes, all of the image's class, so its first token is the label.
    """
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["ImageId", "PredictionString"]:
        got = ",".join(rows[0]) if rows else "an empty file"
        raise LabelFileError(f"{path}:1: expected header 'ImageId,PredictionString', got {got!r}")
    labels: dict[str, str] = {}
    for n, row in enumerate(rows[1:], 2):
        if not row:
            continue
        wnid = row[1].split()[0] if len(row) == 2 and row[1].split() else ""
        if not WNID_RE.fullmatch(wnid):
            raise LabelFileError(f"{path}:{n}: expected '<ImageId>,<wnid> <box...>', got {','.join(row)!r}")
        image = row[0].strip()
        if labels.setdefault(image, wnid) != wnid:  # as in read_val_labels: the later row silently won
            raise LabelFileError(f"{path}:{n}: {image} labelled {wnid} here but {labels[image]} earlier")
    return labels


def read_synset_names(path: Path) -> dict[str, str]:
    """Wnid -> human name from ``<wnid> <name>`` lines (``LOC_synset_mapping.txt``, ``synset_words.txt``)."""
    names: dict[str, str] = {}
    for n, line in _lines(path):
        wnid, _, name = line.partition(" ")
        if not WNID_RE.fullmatch(wnid):
            raise LabelFileError(f"{path}:{n}: expected '<wnid> <name>', got {line!r}")
        names[wnid] = name.strip()
    return names


@dataclass(frozen=True)
class Devkit:
    """What layout (d) needs from the ILSVRC2012 devkit."""

    where: str  # the devkit directory or archive, for messages
    ground_truth: list[int]  # ILSVRC2012_ID of val image k at index k-1 (ILSVRC2012_val_0000000k)
    id_to_wnid: dict[int, str]  # leaf synsets only (the 1000 classes)
    names: dict[str, str]  # wnid -> meta.mat "words"

    def label(self, val_name: str) -> tuple[str | None, str]:
        """``(wnid, "")`` for ``ILSVRC2012_val_<k>.JPEG`` (ground-truth line k via meta.mat), or ``(None, why not)``.

        Going by the number in the name rather than by sorted position keeps every label
        right even when some val images are missing.
        """
        where = f"{self.where}/{GROUND_TRUTH}"
        match = _VAL_NAME_RE.fullmatch(val_name)
        k = int(match[1]) if match else 0
        if not 1 <= k <= len(self.ground_truth):
            return None, f"no label in {where}"
        ilsvrc_id = self.ground_truth[k - 1]
        if ilsvrc_id not in self.id_to_wnid:
            return None, f"label {ilsvrc_id} in {where} names no class in meta.mat"
        return self.id_to_wnid[ilsvrc_id], ""


def find_devkit(root: Path) -> Path | None:
    """The devkit directory or, failing that, the devkit archive in ``root``, if present."""
    if (root / DEVKIT_DIR).is_dir():
        return root / DEVKIT_DIR
    return root / DEVKIT_ARCHIVE if (root / DEVKIT_ARCHIVE).is_file() else None


def load_devkit(path: Path) -> Devkit:
    """Read the ground truth and ``meta.mat`` from a devkit directory or ``.tar.gz`` archive."""
    read = _read_from_dir if path.is_dir() else _read_from_archive
    gt_bytes, meta_bytes = read(path, GROUND_TRUTH), read(path, META)
    ground_truth = []
    for n, line in enumerate(gt_bytes.decode().splitlines(), 1):
        if not line.strip().isdigit():
            raise LabelFileError(f"{path}/{GROUND_TRUTH}:{n}: expected an ILSVRC2012_ID, got {line!r}")
        ground_truth.append(int(line))
    id_to_wnid, names = _parse_meta(meta_bytes, f"{path}/{META}")
    return Devkit(str(path), ground_truth, id_to_wnid, names)


def _read_from_dir(devkit: Path, name: str) -> bytes:
    """The file ``name`` of an extracted devkit directory."""
    if not (devkit / name).is_file():
        raise LabelFileError(f"{devkit}: no {name} inside")
    return (devkit / name).read_bytes()


def _read_from_archive(archive: Path, suffix: str) -> bytes:
    """The regular file whose name ends in ``suffix`` inside a (compressed) devkit archive."""
    with tarfile.open(archive, mode="r:*") as tar:
        for info in tar:
            if info.isreg() and (info.name == suffix or info.name.endswith("/" + suffix)):
                f = tar.extractfile(info)
                assert f is not None  # regular files always have data
                return f.read()
    raise LabelFileError(f"{archive}: no {suffix} inside")


def _parse_meta(data: bytes, where: str) -> tuple[dict[int, str], dict[str, str]]:
    """ILSVRC2012_ID -> wnid and wnid -> words for the leaf synsets of ``meta.mat``.

    The devkit numbers classes by ILSVRC2012_ID, which is not sorted-wnid order; only this
    map ties the ground truth to wnids.
    """
    try:
        synsets = np.atleast_1d(scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"])
        rows = [(int(s["ILSVRC2012_ID"]), str(s["WNID"]), str(s["words"]), int(s["num_children"])) for s in synsets]
    except (KeyError, ValueError, TypeError, scipy.io.matlab.MatReadError) as e:
        wanted = "a 'synsets' struct array with ILSVRC2012_ID, WNID, words, num_children"
        raise LabelFileError(f"{where}: expected {wanted} ({e})") from e
    leaves = [(i, w, words) for i, w, words, children in rows if children == 0]
    return {i: w for i, w, _ in leaves}, {w: words for _, w, words in leaves}
