"""Layout detection and enumeration (shards.layouts) on tiny real trees of each layout."""
from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest

from shards.layouts import LayoutError, scan
from shards.sources import Inventory, read_bytes
from tests import layout_fixtures as fx

SORTED = sorted(fx.WNIDS)


def assert_inventory(inv: Inventory, expected: fx.Expected, layout_prefix: str) -> None:
    """Layout, sorted classes, one source per expected image with its class and exact bytes."""
    assert inv.layout.startswith(layout_prefix)
    assert inv.classes == SORTED
    assert {s.path for s in inv.sources} == set(expected)
    for s in inv.sources:
        split, wnid, data = expected[s.path]
        assert (s.split, s.wnid) == (split, wnid), s.path
        assert read_bytes(s) == data, s.path
    assert inv.sources == sorted(inv.sources, key=lambda s: (s.split, s.path))
    counts = {split: sum(s.split == split for s in inv.sources) for split in ("train", "val")}
    assert counts == {"train": len(fx.WNIDS) * fx.PER_CLASS, "val": len(fx.VAL_WNIDS)}


def skip_reasons(inv: Inventory) -> dict[str, str]:
    """Skipped path -> reason."""
    return {s.path: s.reason for s in inv.skipped}


# ---- (a) ------------------------------------------------------------------------------

def test_layout_a(tmp_path: Path) -> None:
    expected = fx.make_a(tmp_path)
    inv = scan(tmp_path)
    assert_inventory(inv, expected, "(a)")
    assert inv.skipped == [] and inv.ignored == [] and inv.names == {}
    assert inv.root == str(tmp_path)


def test_layout_a_hidden_unknown_and_stray_files(tmp_path: Path) -> None:
    expected = fx.make_a(tmp_path)
    hidden_files = ("train/.DS_Store", f"train/{fx.WNIDS[0]}/._a.JPEG", "val/.hidden/b.JPEG")
    hidden = [fx.write(tmp_path / p, b"x") for p in hidden_files]
    readme = fx.write(tmp_path / "train" / fx.WNIDS[1] / "README", b"not an image")
    expected[str(readme)] = ("train", fx.WNIDS[1], b"not an image")
    stray = fx.write(tmp_path / "train" / "misc" / "c.JPEG", fx.jpeg(1))
    loose = fx.write(tmp_path / "train" / "d.JPEG", fx.jpeg(2))
    unknown = fx.write(tmp_path / "val" / fx.UNKNOWN / "e.JPEG", fx.jpeg(3))
    unsorted = fx.write(tmp_path / "val" / "ILSVRC2012_val_00000042.JPEG", fx.jpeg(4))  # valprep.sh cut short
    (tmp_path / "train" / "n05000005").mkdir()  # an empty class still takes an index
    inv = scan(tmp_path)
    assert inv.classes == sorted(SORTED + ["n05000005"])
    assert {s.path: (s.split, s.wnid) for s in inv.sources} == {p: e[:2] for p, e in expected.items()}
    assert sorted(inv.ignored) == inv.ignored == sorted(map(str, hidden))
    assert skip_reasons(inv) == {str(stray): "not a class directory", str(loose): "not in a class directory",
                                 str(unknown): f"unknown class {fx.UNKNOWN}",
                                 str(unsorted): "a val image not sorted into its class folder: finish sorting val/ "
                                 "(valprep.sh), or move the class folders' images back and give a label file "
                                 "(--val_labels)"}


def test_layout_a_follows_symlinked_class_dirs_without_looping(tmp_path: Path) -> None:
    expected = fx.make_a(tmp_path / "real")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "val").symlink_to(tmp_path / "real" / "val")
    (tmp_path / "tree" / "train").mkdir()
    for w in fx.WNIDS:
        (tmp_path / "tree" / "train" / w).symlink_to(tmp_path / "real" / "train" / w)
    (tmp_path / "real" / "train" / fx.WNIDS[0] / "loop").symlink_to(tmp_path / "real" / "train" / fx.WNIDS[0])
    inv = scan(tmp_path / "tree")
    assert inv.classes == SORTED
    by_bytes = {data: (split, wnid) for split, wnid, data in expected.values()}
    assert sorted((s.split, s.wnid) for s in inv.sources) == sorted(by_bytes.values())
    assert all(by_bytes[read_bytes(s)] == (s.split, s.wnid) for s in inv.sources)


def test_layout_a_names_from_optional_mapping(tmp_path: Path) -> None:
    fx.make_a(tmp_path)
    fx.write(tmp_path / "synset_words.txt", b"".join(f"{w} {fx.NAMES[w]}\n".encode() for w in fx.NAMES))
    assert scan(tmp_path).names == {w: fx.NAMES[w] for w in SORTED}


# ---- (b) ------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["space", "comma", "index", "no-extension"])
def test_layout_b_label_styles(tmp_path: Path, style: str) -> None:
    def line(name: str, w: str) -> str:
        return {"space": f"{name}  {w}", "comma": f"{name},{w}", "index": f"{name} {SORTED.index(w)}",
                "no-extension": f"{name.removesuffix('.JPEG')}\t{w}"}[style]

    expected = fx.make_b(tmp_path, [line(name, w) for w, name, _ in fx.val_images()])
    inv = scan(tmp_path)
    assert_inventory(inv, expected, "(b)")
    assert str(tmp_path / "val.txt") in inv.layout


def test_layout_b_label_file_in_val_dir_is_not_an_image(tmp_path: Path) -> None:
    lines = [f"{name} {w}" for w, name, _ in fx.val_images()]
    expected = fx.make_b(tmp_path, lines, label_path="val/val_labels.txt")
    inv = scan(tmp_path)
    assert_inventory(inv, expected, "(b)")
    assert inv.skipped == []


def test_layout_b_explicit_labels_and_unlabelled_images(tmp_path: Path) -> None:
    images = fx.val_images()
    lines = [f"{name} {w}" for w, name, _ in images[1:]]
    expected = fx.make_b(tmp_path, lines, label_path="elsewhere/my_labels")
    first = str(tmp_path / "val" / images[0][1])
    del expected[first]
    extra = {fx.write(tmp_path / "val" / "unknown.JPEG", fx.jpeg(10)): f"unknown class {fx.UNKNOWN}"}
    with (tmp_path / "elsewhere" / "my_labels").open("a") as f:
        f.write(f"unknown.JPEG {fx.UNKNOWN}\n")
    labels = tmp_path / "elsewhere" / "my_labels"
    with pytest.raises(LayoutError, match="label file"):
        scan(tmp_path)  # not at a documented place, so (b) does not match
    inv = scan(tmp_path, val_labels=labels)
    assert {s.path for s in inv.sources} == set(expected)
    assert skip_reasons(inv) == {first: f"no label in {labels}"} | {str(p): r.format(labels) for p, r in extra.items()}


def test_layout_b_class_indices_past_the_train_classes_refuse_the_label_file(tmp_path: Path) -> None:
    """Caffe's val.txt labels by position in the sorted class list: with a class folder missing,
    every later index named the next class, silently (only the last index was skipped)."""
    images = fx.val_images()
    fx.make_b(tmp_path, [f"{name} {SORTED.index(w)}" for w, name, _ in images] + ["ILSVRC2012_val_00000099.JPEG 3"])
    with pytest.raises(LayoutError, match=r"val\.txt: class index 3 but train/ holds 3 classes: .* restore the "
                                          r"missing class folder\(s\) or label val by wnid"):
        scan(tmp_path)


def test_layout_b_header_line_names_file_and_line(tmp_path: Path) -> None:
    fx.make_b(tmp_path, ["filename label"] + [f"{name} {w}" for w, name, _ in fx.val_images()])
    with pytest.raises(LayoutError, match=r"val\.txt:1: expected '<filename> <wnid or class index>'"):
        scan(tmp_path)


def test_val_labels_rejected_for_other_layouts(tmp_path: Path) -> None:
    fx.make_a(tmp_path)
    with pytest.raises(LayoutError, match=r"only applies to layout \(b\)"):
        scan(tmp_path, val_labels=fx.write(tmp_path / "labels.txt", b""))


# ---- (c) ------------------------------------------------------------------------------

def test_layout_c_kaggle(tmp_path: Path) -> None:
    expected = fx.make_c(tmp_path)
    fx.write(tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "._ILSVRC2012_val_00000001.JPEG", b"x")
    inv = scan(tmp_path)
    assert_inventory(inv, expected, "(c) Kaggle")
    assert inv.names == {w: fx.NAMES[w] for w in SORTED}
    assert inv.skipped == [] and len(inv.ignored) == 1
    assert not any("test" in s.path.split("/") for s in inv.sources)


def test_layout_c_bad_header(tmp_path: Path) -> None:
    fx.make_c(tmp_path)
    solution = tmp_path / "LOC_val_solution.csv"
    solution.write_text("id,label\n" + solution.read_text().split("\n", 1)[1])
    with pytest.raises(LayoutError, match=r"LOC_val_solution\.csv:1: expected header 'ImageId,PredictionString'"):
        scan(tmp_path)


# ---- (d) ------------------------------------------------------------------------------

@pytest.mark.parametrize("devkit", ["dir", "targz"])
def test_layout_d_raw_tars(tmp_path: Path, devkit: str) -> None:
    expected = fx.make_d(tmp_path, devkit=devkit)
    inv = scan(tmp_path)
    assert_inventory(inv, expected, "(d)")
    assert inv.names == {w: fx.NAMES[w] for w in SORTED}  # the non-leaf synset and unknown leaf are not classes
    assert inv.skipped == [] and inv.ignored == []
    for s in inv.sources:
        assert s.tar in (str(tmp_path / "ILSVRC2012_img_train.tar"), str(tmp_path / "ILSVRC2012_img_val.tar"))


def test_layout_d_unsafe_members_are_skipped_never_read(tmp_path: Path) -> None:
    train_tar = tmp_path / "ILSVRC2012_img_train.tar"
    outer_extra = [("../evil.JPEG", b"x"), ("/etc/x.JPEG", b"y"), ("notes.txt", b"z"), ("._n01000001.tar", b"")]
    expected = fx.make_d(tmp_path, inner_extra=fx.evil_members(), outer_extra=outer_extra)
    inv = scan(tmp_path)
    assert {s.path for s in inv.sources} == set(expected)
    inner = f"{train_tar}:{fx.WNIDS[0]}.tar"
    assert skip_reasons(inv) == {
        f"{train_tar}:../evil.JPEG": "unsafe tar member: path contains '..' (never read)",
        f"{train_tar}:/etc/x.JPEG": "unsafe tar member: absolute path '/etc/x.JPEG' (never read)",
        f"{train_tar}:notes.txt": "not a per-class <wnid>.tar",
        f"{inner}:../evil.JPEG": "unsafe tar member: path contains '..' (never read)",
        f"{inner}:/etc/x.JPEG": "unsafe tar member: absolute path '/etc/x.JPEG' (never read)",
        f"{inner}:link.JPEG": "unsafe tar member: symlink to '/etc/passwd' (never read)",
        f"{inner}:hard.JPEG": "unsafe tar member: hard link to 'somewhere.JPEG' (never read)",
        f"{inner}:pipe.JPEG": "unsafe tar member: fifo (never read)",
    }
    assert inv.ignored == [f"{train_tar}:._n01000001.tar"]
    assert all(s.split == "train" for s in inv.skipped)


def test_layout_d_val_labels_unknown_and_missing(tmp_path: Path) -> None:
    val_tar = tmp_path / "ILSVRC2012_img_val.tar"
    names = [f"ILSVRC2012_val_{k:08d}.JPEG" for k in (7, 8, 9)] + ["stray.JPEG"]
    expected = fx.make_d(tmp_path, val_extra=[(n, fx.jpeg(i)) for i, n in enumerate(names)],
                         ground_truth_extra=[fx.ILSVRC_ID[fx.UNKNOWN], fx.NON_LEAF[1]])
    inv = scan(tmp_path)
    assert_inventory(inv, expected, "(d)")
    gt = f"{tmp_path / 'ILSVRC2012_devkit_t12'}/data/ILSVRC2012_validation_ground_truth.txt"
    assert skip_reasons(inv) == {
        f"{val_tar}:{names[0]}": f"unknown class {fx.UNKNOWN}",
        f"{val_tar}:{names[1]}": f"label {fx.NON_LEAF[1]} in {gt} names no class in meta.mat",
        f"{val_tar}:{names[2]}": f"no label in {gt}",
        f"{val_tar}:stray.JPEG": f"no label in {gt}",
    }
    assert {s.split for s in inv.skipped} == {"val"}


def test_layout_d_compressed_tar_is_rejected(tmp_path: Path) -> None:
    fx.make_d(tmp_path)
    train_tar = tmp_path / "ILSVRC2012_img_train.tar"
    train_tar.write_bytes(gzip.compress(train_tar.read_bytes()))
    with pytest.raises(LayoutError, match="not an uncompressed tar.*decompressed first"):
        scan(tmp_path)


def test_layout_d_damaged_inner_tar_is_skipped(tmp_path: Path) -> None:
    train_tar = tmp_path / "ILSVRC2012_img_train.tar"
    expected = fx.make_d(tmp_path, outer_extra=[("n05000005.tar", b"garbage" * 100)])
    inv = scan(tmp_path)
    assert {s.path for s in inv.sources} == set(expected)
    assert list(skip_reasons(inv)) == [f"{train_tar}:n05000005.tar"]
    assert "unreadable inner tar" in inv.skipped[0].reason


# ---- detection ------------------------------------------------------------------------

def test_empty_dir_lists_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(LayoutError) as err:
        scan(tmp_path)
    message = str(err.value)
    for expected in ["(a)", "(b)", "(c)", "(d)", "train/<wnid>/", "val/<wnid>/", "val.txt",
                     "ILSVRC/Data/CLS-LOC/train/<wnid>/", "LOC_val_solution.csv", "LOC_synset_mapping.txt",
                     "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12/",
                     "ILSVRC2012_devkit_t12.tar.gz", "MISSING"]:
        assert expected in message
    assert isinstance(err.value, ValueError)


def test_flat_val_without_labels_says_label_file_missing(tmp_path: Path) -> None:
    fx.write_train(tmp_path / "train")
    fx.write_flat_val(tmp_path / "val")
    line = r"\(b\) [^\n]*train/<wnid>/ \[found\], val/ \[found\], label file [^\n]* \[MISSING\]"
    with pytest.raises(LayoutError, match=line):
        scan(tmp_path)


def test_missing_root(tmp_path: Path) -> None:
    """It said only 'not a directory', for a path that did not exist at all."""
    with pytest.raises(LayoutError, match=r"nope: no such directory: --src \(SRC=\) must name the directory that "
                                          r"holds ImageNet"):
        scan(tmp_path / "nope")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(LayoutError, match=r"file: not a directory: --src"):
        scan(tmp_path / "file")


@pytest.mark.parametrize("key, value, says", [
    ("workers", -1, "workers must be in 0..1024 (0 = one per core"), ("chunk", 0, "chunk must be at least 1, got 0"),
    ("stats_images", -5, "stats_images must be at least 0, got -5"),
    ("shard_bytes", 0, "shard_samples 0, shard_bytes 0: set either or both to a positive limit")])
def test_a_bad_setting_is_named_with_its_value(tmp_path: Path, key: str, value: int, says: str) -> None:
    """'workers and stats_images must be >= 0, chunk >= 1' named neither the key nor its value."""
    from common.config import ConfigError
    from shards.config import ShardConfig

    extra = {"shard_samples": 0} if key == "shard_bytes" else {}
    with pytest.raises(ConfigError, match=re.escape(says)):
        ShardConfig(src=tmp_path, **{key: value}, **extra).validate()
