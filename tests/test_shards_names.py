"""File names a real ImageNet copy can hold: bytes that are not UTF-8, spaces, newlines, dashes."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import ROOT

A = "n00000001"


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def _write(root: Path, rel: bytes, data: bytes) -> None:
    path = os.fsencode(root) + b"/" + rel
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_names_that_are_not_utf8_are_sharded_and_reported(tmp_path: Path) -> None:
    """A Latin-1 name (copied from an old Windows share) used to end the run in a
    UnicodeEncodeError traceback before any shard was written; a skipped one, after the
    manifest, when the terminal's encoding is strict UTF-8 (any locale but C)."""
    src = tmp_path / "src"
    _write(src, f"train/{A}/caf\xe9.JPEG".encode("latin-1"), _jpeg(1))
    _write(src, f"train/{A}/empty\xe9.JPEG".encode("latin-1"), b"")
    for rel, seed in ((f"train/{A}/a b.JPEG", 2), (f"train/{A}/new\nline.JPEG", 3), (f"train/{A}/-dash.JPEG", 4),
                      (f"val/{A}/ünï©ødé.JPEG", 5)):
        _write(src, rel.encode(), _jpeg(seed))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8:strict"}
    done = subprocess.run([sys.executable, "-m", "shards", "--src", str(src), "--out", str(out), "--workers", "1",
                           "--max_skipped_fraction", "0.5"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "skipped " in done.stdout and "empty\\xe9.JPEG: empty file" in done.stdout
    record = json.loads((out / "manifest.json").read_text())
    assert record["written"] == 5 and record["splits"]["train"]["samples"] == 4
    assert [os.fsencode(s["path"]).endswith(b"empty\xe9.JPEG") for s in record["skipped"]] == [True]


def test_an_image_pillow_cannot_convert_is_skipped_not_the_end_of_the_run(tmp_path: Path) -> None:
    """A LAB TIFF named .JPEG (a scanner's or Photoshop's export): without littlecms, Pillow's
    conversion to RGB raises ImportError, which went past the skip handling and ended the run,
    and every re-run, on that one file."""
    from shards.build import build
    from shards.config import ShardConfig

    src = tmp_path / "src"
    _write(src, f"train/{A}/good.JPEG".encode(), _jpeg(1))
    _write(src, f"val/{A}/good.JPEG".encode(), _jpeg(2))
    buf = io.BytesIO()
    Image.new("LAB", (300, 200), (50, 10, 20)).save(buf, "TIFF")
    _write(src, f"train/{A}/lab.JPEG".encode(), buf.getvalue())
    record = build(ShardConfig(src=src, out=tmp_path / "out", workers=1, max_skipped_fraction=0.5).validate())
    assert record["inputs"] == 3 == record["written"] + len(record["skipped"])
    for skip in record["skipped"]:  # with littlecms it converts; without, it is a skip that says what to do
        assert skip["path"].endswith("lab.JPEG") and "convert it to an RGB JPEG" in skip["reason"]


def test_a_fifo_or_device_among_the_images_is_skipped_not_read(tmp_path: Path) -> None:
    """A fifo named like an image hung the run for ever (its read waits for a writer); a link to
    /dev/zero would read without end.  Neither is opened now."""
    from tests.shards_proc import Sharder

    src = tmp_path / "src"
    _write(src, f"train/{A}/good.JPEG".encode(), _jpeg(1))
    _write(src, f"val/{A}/good.JPEG".encode(), _jpeg(2))
    os.mkfifo(src / "train" / A / "fifo.JPEG")
    os.symlink("/dev/zero", src / "train" / A / "zero.JPEG")
    sharder = Sharder(src, tmp_path / "out", "--workers", "1", "--max_skipped_fraction", "0.9")
    assert sharder.wait(timeout=60) == 0, "\n".join(sharder.errors)
    record = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {Path(s["path"]).name: s["reason"] for s in record["skipped"]} == {
        name: "not a regular file (a fifo, device or socket): never read" for name in ("fifo.JPEG", "zero.JPEG")}


def test_a_file_too_large_to_be_a_photo_is_skipped_unread(tmp_path: Path) -> None:
    """A multi-GB file among the images (a video, a disk image) was read whole into a worker's
    memory; it is now a skip saying why, and never read (the file here is sparse)."""
    from shards.build import build
    from shards.config import ShardConfig
    from shards.sources import MAX_INPUT_BYTES

    src = tmp_path / "src"
    _write(src, f"train/{A}/good.JPEG".encode(), _jpeg(1))
    _write(src, f"val/{A}/good.JPEG".encode(), _jpeg(2))
    with open(src / "train" / A / "movie.JPEG", "wb") as f:
        f.truncate(MAX_INPUT_BYTES + 1)
    record = build(ShardConfig(src=src, out=tmp_path / "out", workers=1, max_skipped_fraction=0.5).validate())
    assert record["written"] == 2 and [(Path(s["path"]).name, s["reason"]) for s in record["skipped"]] == [
        ("movie.JPEG", "1.0 GiB, too large to be a photo (the limit is 1 GiB); remove it from the image folders")]
