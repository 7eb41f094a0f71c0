"""Classes a real copy can lose on the way: said at the end of the run, not found in training."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from tests.conftest import run_module

A, B, C = "n00000001", "n00000002", "n00000003"


def _image(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (300, 300), (shade, 100, 50)).save(path, "JPEG")


def test_a_class_without_training_images_is_warned_about(tmp_path: Path) -> None:
    """An empty class folder (a failed extraction) keeps its index, so the run succeeds; the
    model gets an output it can never learn, and nothing said so."""
    src = tmp_path / "src"
    for i, wnid in enumerate((A, B)):
        _image(src / "train" / wnid / "a.JPEG", 40 * i)
        _image(src / "val" / wnid / "v.JPEG", 40 * i + 5)
    (src / "train" / C).mkdir()
    done = run_module("shards", "--src", str(src), "--out", str(tmp_path / "out"), "--workers", "1")
    assert f"warning: 1 of 3 classes have no training image: {C}" in done.stdout
    full = run_module("shards", "--src", str(src), "--out", str(tmp_path / "out2"), "--workers", "1",
                      "--max_skipped_fraction", "0", check=False)
    assert "warning" in full.stdout and full.returncode == 0


def test_a_class_archive_left_packed_says_to_extract_it(tmp_path: Path) -> None:
    """``tar xf ILSVRC2012_img_train.tar -C train`` gives one <wnid>.tar per class; one left
    unextracted dropped its class (indices shift) under a reason that did not say why."""
    import tarfile

    src = tmp_path / "src"
    for i, wnid in enumerate((A, B, C)):
        _image(src / "train" / wnid / "a.JPEG", 40 * i)
        _image(src / "val" / wnid / "v.JPEG", 40 * i + 5)
    with tarfile.open(src / "train" / f"{C}.tar", "w") as tar:
        tar.add(src / "train" / C / "a.JPEG", "a.JPEG")
    for f in (src / "train" / C).iterdir():
        f.unlink()
    (src / "train" / C).rmdir()
    done = run_module("shards", "--src", str(src), "--out", str(tmp_path / "out"), "--workers", "1",
                      "--max_skipped_fraction", "0.5")
    assert f"train/{C}.tar: a class archive, not read" in done.stdout
    assert f"extract it into {C}/ and re-run" in done.stdout


def test_val_images_a_label_file_lists_but_the_folder_lacks_are_counted(tmp_path: Path) -> None:
    """A flat val/ missing images its label file (b) or Kaggle solution (c) lists (a download cut
    short) gave a smaller val split and nothing else; each missing one is now a skip, so the
    accounting names it and max_skipped_fraction applies."""
    import tests.layout_fixtures as fx
    from shards.layouts import scan

    b, c = tmp_path / "b", tmp_path / "c"
    fx.make_b(b, [f"{name} {w}" for w, name, _ in fx.val_images()])
    fx.make_c(c)
    for root, val in ((b, b / "val"), (c, c / "ILSVRC" / "Data" / "CLS-LOC" / "val")):
        gone = sorted(val.iterdir())[0]
        gone.unlink()
        inv = scan(root)
        assert len(inv.skipped) == 1 and inv.skipped[0].split == "val", inv.skipped
        assert gone.stem in inv.skipped[0].path and "but not found under" in inv.skipped[0].reason


def test_no_usable_training_image_ends_in_one_line(tmp_path: Path) -> None:
    """Empty training class folders, or every training image skipped under a lenient
    max_skipped_fraction, went on to the statistics and ended in a ValueError traceback."""
    src = tmp_path / "src"
    _image(src / "val" / A / "v.JPEG", 5)
    (src / "train" / A).mkdir(parents=True)
    empty = run_module("shards", "--src", str(src), "--out", str(tmp_path / "o1"), "--workers", "1", check=False)
    assert empty.returncode == 1 and "Traceback" not in empty.stderr, empty.stderr
    assert "no training image found under" in empty.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o1").exists(), "nothing was written"
    (src / "train" / A / "a.JPEG").write_bytes(b"not a jpeg")
    broken = run_module("shards", "--src", str(src), "--out", str(tmp_path / "o2"), "--workers", "1",
                        "--max_skipped_fraction", "1", check=False)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr, broken.stderr
    assert "none of the 1 training images could be used" in broken.stderr.strip().splitlines()[-1]
    assert "a.JPEG" in (tmp_path / "o2" / "skipped.json").read_text()


def test_a_kaggle_solution_labelling_one_image_twice_differently_names_the_line(tmp_path: Path) -> None:
    """Two rows for one ImageId with different classes: the later silently won (the flat label
    file of layout (b) already refused this, naming the line)."""
    import pytest

    import tests.layout_fixtures as fx
    from shards.layouts import LayoutError, scan

    fx.make_c(tmp_path)
    w, name, _ = fx.val_images()[0]
    other = next(x for x in fx.WNIDS if x != w)
    with (tmp_path / "LOC_val_solution.csv").open("a") as f:
        f.write(f"\n{name.removesuffix('.JPEG')},{other} 1 2 3 4\n")
    with pytest.raises(LayoutError, match=rf"LOC_val_solution\.csv:\d+: {name.removesuffix('.JPEG')} labelled {other}"):
        scan(tmp_path)
