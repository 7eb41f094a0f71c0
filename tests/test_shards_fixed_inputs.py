"""Re-running after the inputs changed in place: what the sharder reads is what it writes."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.build import TooManySkipped, build
from shards.config import ShardConfig

A, B = "n00000001", "n00000002"


def _jpeg(seed: int, size: tuple[int, int] = (300, 200)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def _corpus(root: Path) -> None:
    for split, n in (("train", 4), ("val", 1)):
        for c, wnid in enumerate((A, B)):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                (root / split / wnid / f"{i}.JPEG").write_bytes(_jpeg(100 * c + 10 * i + (split == "val")))


def _sources(out: Path) -> list[str]:
    names = []
    for tar in sorted((out / "train").glob("*.tar")):
        with tarfile.open(tar) as f:
            names += [json.loads(f.extractfile(m).read())["source"] for m in f if m.name.endswith(".json")]
    return names


def test_a_file_fixed_in_place_is_read_again(tmp_path: Path) -> None:
    """The skip report says 'fix or remove them'; fixing one (copying it again, same name) and
    re-running used to keep the journaled shards without it and fail with the same skip."""
    src, out = tmp_path / "src", tmp_path / "out"
    _corpus(src)
    bad = src / "train" / A / "2.JPEG"
    good = bad.read_bytes()
    bad.write_bytes(good[:1500])
    cfg = ShardConfig(src=src, out=out, workers=1, max_skipped_fraction=0.0).validate()
    with pytest.raises(TooManySkipped, match="1 of 10 inputs"):
        build(cfg)
    bad.write_bytes(good)
    record = build(cfg)
    assert record["skipped"] == [] and record["written"] == 10
    assert f"train/{A}/2.JPEG" in _sources(out)


def test_a_finished_directory_follows_an_image_replaced_in_place(tmp_path: Path, capsys) -> None:
    """An image replaced under the same name (a re-download, a fixed crop) used to leave the
    finished directory 'complete and unchanged; nothing to do', still training on the old pixels.
    The re-run says why it writes the split's shards again (for ImageNet: hours)."""
    src, out = tmp_path / "src", tmp_path / "out"
    _corpus(src)
    cfg = ShardConfig(src=src, out=out, workers=1).validate()
    before = build(cfg)
    (src / "train" / B / "0.JPEG").write_bytes(_jpeg(999, size=(400, 300)))
    capsys.readouterr()
    after = build(cfg)
    said = capsys.readouterr().out
    assert f"shards: {out / 'train'}: its 1 finished shard(s) were cut from other inputs or settings" in said, said
    assert f"{out / 'val'}: its" not in said, said
    assert after["splits"]["train"]["shards"][0]["sha256"] != before["splits"]["train"]["shards"][0]["sha256"]
    assert after["splits"]["val"] == before["splits"]["val"]
