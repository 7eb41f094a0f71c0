"""Each input layout (a)-(d) sharded end to end and read back: labels and counts right."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import tests.layout_fixtures as fx
from shards import manifest as contract
from shards.build import build
from shards.config import ShardConfig
from shards.imaging import prepare

LAYOUTS = {
    "a": fx.make_a,
    "b": lambda root: fx.make_b(root, [f"{name} {w}" for w, name, _ in fx.val_images()]),
    "c": fx.make_c,
    "d": fx.make_d,
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_shards_read_back_with_right_labels(layout: str, tmp_path: Path) -> None:
    root = tmp_path / "src"
    expected = LAYOUTS[layout](root)
    out = tmp_path / "out"
    record = build(ShardConfig(src=root, out=out, shard_samples=2, workers=2).validate())
    assert record["parameters"]["layout"].startswith(f"({layout})")
    m = contract.load(out, deep=True)
    assert m.classes == tuple(sorted(fx.WNIDS))
    by_source = {key[len(str(root)) + 1:]: value for key, value in expected.items()}
    seen = []
    for split in ("train", "val"):
        samples = list(wds.WebDataset([str(s.tar) for s in m.splits[split].shards], shardshuffle=False))
        counts = Counter()
        for s in samples:
            meta = json.loads(s["json"])
            want_split, want_wnid, original = by_source[meta["source"]]
            assert (split, m.classes[int(s["cls"])]) == (want_split, want_wnid), meta["source"]
            # The stored image is the original's re-encoding, pixel for pixel.
            stored = np.asarray(Image.open(io.BytesIO(s["jpg"])), dtype=np.int16)
            assert np.array_equal(stored, np.asarray(Image.open(io.BytesIO(prepare(original).jpeg)), dtype=np.int16))
            counts[want_wnid] += 1
            seen.append(meta["source"])
        assert list(m.splits[split].class_counts) == [counts[w] for w in m.classes]
    assert sorted(seen) == sorted(by_source)
    assert record["inputs"] == len(expected) + len(record["skipped"]) and record["written"] == len(expected)
    names = [c["name"] for c in record["classes"]]
    if layout in "cd":
        assert names == [fx.NAMES[w] for w in m.classes]
