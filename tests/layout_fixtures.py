"""Tiny ImageNet-shaped trees for the layout scanner tests: real JPEGs, three classes.

Every builder returns ``{report path: (split, wnid, file bytes)}`` for the images a scan
must list, so a test can check each source's class and bytes.  Val labels are deliberately
not in sorted-wnid order, and the devkit's ILSVRC2012_IDs map to wnids non-monotonically,
as in the real devkit, so a scanner mixing the two orders fails.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

WNIDS = ["n02000002", "n03000003", "n01000001"]  # creation order, deliberately unsorted
UNKNOWN = "n04000004"  # a real leaf class of the devkit that has no train images
PER_CLASS = 2
# Label of ILSVRC2012_val_<k>, k = 1..6: not sorted, not grouped.
VAL_WNIDS = ["n03000003", "n01000001", "n02000002", "n03000003", "n02000002", "n01000001"]
# The devkit numbers classes in its own order, which is not sorted-wnid order.
ILSVRC_ID = {"n03000003": 1, "n01000001": 2, "n04000004": 3, "n02000002": 4}
NON_LEAF = ("n09000009", 5)  # a meta.mat synset with children: never a class
NAMES = {"n01000001": "alpha, first", "n02000002": "beta", "n03000003": "gamma ray", UNKNOWN: "delta"}

Expected = dict[str, tuple[str, str, bytes]]


def jpeg(seed: int) -> bytes:
    """A small real JPEG, different for each seed."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def train_images() -> list[tuple[str, str, bytes]]:
    """(wnid, file name, bytes) of every train image, in creation order."""
    return [(w, f"{w}_{n}.JPEG", jpeg(100 * c + n)) for c, w in enumerate(WNIDS) for n in range(PER_CLASS)]


def val_images() -> list[tuple[str, str, bytes]]:
    """(wnid, file name, bytes) of every val image, ``ILSVRC2012_val_<k>.JPEG``."""
    return [(w, f"ILSVRC2012_val_{k:08d}.JPEG", jpeg(1000 + k)) for k, w in enumerate(VAL_WNIDS, 1)]


def write(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path``, creating its directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_train(train: Path) -> Expected:
    """``train/<wnid>/<wnid>_<n>.JPEG`` for every class."""
    return {str(write(train / w / name, data)): ("train", w, data) for w, name, data in train_images()}


def write_flat_val(val: Path) -> Expected:
    """A flat ``val/`` directory of every val image."""
    return {str(write(val / name, data)): ("val", w, data) for w, name, data in val_images()}


def make_a(root: Path) -> Expected:
    """Layout (a): ``train/<wnid>/`` + ``val/<wnid>/``."""
    expected = write_train(root / "train")
    for w, name, data in val_images():
        expected[str(write(root / "val" / w / name, data))] = ("val", w, data)
    return expected


def make_b(root: Path, label_lines: list[str], label_path: str = "val.txt") -> Expected:
    """Layout (b): ``train/<wnid>/`` + flat ``val/`` + a label file with ``label_lines``."""
    expected = write_train(root / "train") | write_flat_val(root / "val")
    write(root / label_path, "".join(line + "\n" for line in label_lines).encode())
    return expected


def make_c(root: Path) -> Expected:
    """Layout (c): the Kaggle tree, with a ``test/`` dir the scanner must ignore."""
    base = root / "ILSVRC" / "Data" / "CLS-LOC"
    expected = write_train(base / "train") | write_flat_val(base / "val")
    write(base / "test" / "ILSVRC2012_test_00000001.JPEG", jpeg(7))
    rows = ["ImageId,PredictionString"]
    rows += [f"{name.removesuffix('.JPEG')},{w} 1 2 30 40 {w} 5 6 7 8 " for w, name, _ in val_images()]
    write(root / "LOC_val_solution.csv", "\n".join(rows).encode())
    write(root / "LOC_synset_mapping.txt", "".join(f"{w} {NAMES[w]}\n" for w in WNIDS).encode())
    return expected


def tar_of(members: list[tuple[str, bytes]], extra: list[tarfile.TarInfo] = ()) -> bytes:
    """An uncompressed tar holding ``members`` as regular files, then the bare headers ``extra``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.size else None)
    return out.getvalue()


def evil_members() -> list[tarfile.TarInfo]:
    """Members a scanner must never read: path escapes, links, a fifo."""
    infos = []
    for name, kind, link in [
        ("../evil.JPEG", tarfile.REGTYPE, ""),
        ("/etc/x.JPEG", tarfile.REGTYPE, ""),
        ("link.JPEG", tarfile.SYMTYPE, "/etc/passwd"),
        ("hard.JPEG", tarfile.LNKTYPE, "somewhere.JPEG"),
        ("pipe.JPEG", tarfile.FIFOTYPE, ""),
    ]:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size = kind, link, 5 if kind == tarfile.REGTYPE else 0
        infos.append(info)
    return infos


def meta_mat() -> bytes:
    """A ``meta.mat`` with the devkit's field names: leaves (num_children 0) and one parent."""
    rows = [(i, w, NAMES[w], 0) for w, i in ILSVRC_ID.items()] + [(NON_LEAF[1], NON_LEAF[0], "group", 2)]
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((len(rows), 1), dtype=[(f, "O") for f in fields])
    for r, (i, w, words, children) in enumerate(rows):
        synsets[r, 0] = (i, w, words, "gloss", children, np.zeros((1, children)), 0, 10)
    out = io.BytesIO()
    scipy.io.savemat(out, {"synsets": synsets})
    return out.getvalue()


def make_d(root: Path, devkit: str = "dir", inner_extra: list[tarfile.TarInfo] = (),
           outer_extra: list[tuple[str, bytes]] = (), val_extra: list[tuple[str, bytes]] = (),
           ground_truth_extra: list[int] = ()) -> Expected:
    """Layout (d): raw train/val tars (nested per-class tars) + devkit as ``"dir"`` or ``"targz"``.

    ``inner_extra`` headers go into the first inner tar; ``outer_extra`` and ``val_extra``
    are extra regular members of the outer train tar and of the val tar;
    ``ground_truth_extra`` are ILSVRC2012_IDs for val images 7, 8, ...
    """
    train_tar, val_tar = root / "ILSVRC2012_img_train.tar", root / "ILSVRC2012_img_val.tar"
    expected: Expected = {}
    outer = []
    for c, w in enumerate(WNIDS):
        images = [(name, data) for wn, name, data in train_images() if wn == w]
        outer.append((f"{w}.tar", tar_of(images, inner_extra if c == 0 else [])))
        expected |= {f"{train_tar}:{w}.tar:{name}": ("train", w, data) for name, data in images}
    write(train_tar, tar_of(outer + list(outer_extra)))
    write(val_tar, tar_of([(name, data) for _, name, data in val_images()] + list(val_extra)))
    expected |= {f"{val_tar}:{name}": ("val", w, data) for w, name, data in val_images()}
    ids = [ILSVRC_ID[w] for w in VAL_WNIDS] + list(ground_truth_extra)
    ground_truth = "".join(f"{i}\n" for i in ids).encode()
    files = [("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", ground_truth),
             ("ILSVRC2012_devkit_t12/data/meta.mat", meta_mat())]
    if devkit == "dir":
        for name, data in files:
            write(root / name, data)
    else:
        with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return expected
