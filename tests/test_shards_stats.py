"""Dataset statistics: checked against numpy on known pixels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from shards.build import build
from shards.config import ShardConfig
from shards.stats import PixelMoments


def test_moments_match_numpy_on_random_images() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    # Correlated channels, so the covariance has a real structure.
    images[..., 1] = (images[..., 0] // 2 + images[..., 1] // 2)
    moments = PixelMoments(16)
    for img in images[:2]:
        moments.add(img)
    rest = PixelMoments(16)
    for img in images[2:]:
        rest.add(img)
    moments.merge(rest)
    stats = moments.finish()
    pixels = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(stats["mean_image"], images.mean(axis=0))
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=0))
    np.testing.assert_allclose(stats["std"], pixels.std(axis=0))
    np.testing.assert_allclose(stats["covariance"], np.cov(pixels.T, bias=True), rtol=1e-9)
    vec, val = stats["eigvec"], stats["eigval"]
    np.testing.assert_allclose(vec.T @ vec, np.eye(3), atol=1e-12)  # orthonormal columns
    np.testing.assert_allclose(stats["covariance"] @ vec, vec * val, rtol=1e-9, atol=1e-9)
    assert list(val) == sorted(val, reverse=True)
    np.testing.assert_allclose(np.sort(val), np.linalg.eigvalsh(np.cov(pixels.T, bias=True)), rtol=1e-9)


def test_stats_json_from_known_pixels(tmp_path: Path) -> None:
    """Solid-colour images survive JPEG within 1 level, so the expected stats are known exactly."""
    colours = {"n00000001": [(200, 30, 40), (10, 220, 90)], "n00000002": [(60, 60, 250), (128, 128, 128)]}
    src = tmp_path / "src"
    for wnid, cols in colours.items():
        for split in ("train", "val"):
            (src / split / wnid).mkdir(parents=True)
        for i, c in enumerate(cols):
            Image.new("RGB", (320, 256), c).save(src / "train" / wnid / f"{wnid}_{i}.JPEG", "PNG")
        Image.new("RGB", (256, 256), cols[0]).save(src / "val" / wnid / "v.JPEG", "JPEG")
    out = tmp_path / "out"
    build(ShardConfig(src=src, out=out, workers=1, quality=95).validate())
    stats = json.loads((out / "stats.json").read_text())
    known = np.array([c for cols in colours.values() for c in cols], dtype=np.float64)
    np.testing.assert_allclose(stats["mean"], known.mean(axis=0), atol=1.0)
    np.testing.assert_allclose(stats["std"], known.std(axis=0), atol=1.0)
    np.testing.assert_allclose(stats["covariance"], np.cov(known.T, bias=True), atol=2.0 * 255)
    mean_image = np.load(out / stats["mean_image"])
    assert mean_image.shape == (256, 256, 3) and mean_image.dtype == np.float32
    np.testing.assert_allclose(mean_image, np.broadcast_to(known.mean(axis=0), (256, 256, 3)), atol=1.5)
    vec = np.array(stats["eigvec"])
    np.testing.assert_allclose(vec.T @ vec, np.eye(3), atol=1e-9)
    assert stats["images"] == 4 and "0..255" in stats["units"]


def test_stats_over_a_uniform_sample_are_the_first_training_images(sample_src: Path, tmp_path: Path) -> None:
    """With stats_images=N the statistics are exactly those of the first N (shuffled) train samples."""
    import io

    import webdataset as wds

    from shards import manifest as contract

    build(ShardConfig(src=sample_src, out=tmp_path, shard_samples=7, workers=2, stats_images=10).validate())
    stats = json.loads((tmp_path / "stats.json").read_text())
    urls = [str(s.tar) for s in contract.load(tmp_path).splits["train"].shards]
    first = [np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), dtype=np.float64)
             for _, s in zip(range(10), wds.WebDataset(urls, shardshuffle=False))]
    assert stats["images"] == 10 and "first 10 of 144" in stats["computed_over"]
    np.testing.assert_allclose(np.load(tmp_path / "mean_image.npy"), np.mean(first, axis=0), atol=1e-4)
    np.testing.assert_allclose(stats["mean"], np.mean(first, axis=(0, 1, 2)), rtol=1e-9)
