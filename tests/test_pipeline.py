"""The DALI graphs (CPU-only mode): shapes, labels, and every augmentation against numpy."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import LoaderConfig
from pipeline.stats import lighting_covariance, lighting_offset, load_stats
from pipeline.views import crop_hwc, view_stack
from shards.manifest import load

CROP = 224


def tar_labels(shards: Path, split: str) -> dict[int, int]:
    """sample number -> class index, read straight from the tars."""
    out = {}
    for tar_path in sorted((shards / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".cls"):
                    key = member.name.split(".", 1)[0]
                    out[int(key.rsplit("-", 1)[1])] = int(tar.extractfile(member).read())
    return out


def debug_pipeline(shards: Path, train: bool = True, views: int = 1, **cfg):
    from pipeline import _spec
    from pipeline.graph import build_pipeline

    import torch
    spec = _spec(shards, "train" if train else "val", 0, 1, torch.device("cpu"),
                 LoaderConfig(batch_size=48, threads=2, **cfg), train, views, True)
    return spec, build_pipeline(spec, None)


def run_batches(pipe, n: int) -> list[list[np.ndarray]]:
    """n batches, each output as a list of per-sample arrays."""
    batches = []
    for _ in range(n):
        outs = pipe.run()
        batches.append([[np.array(t) for t in out] for out in outs])
    return batches


def samples(batches):
    for batch in batches:
        yield from zip(*batch)


@pytest.fixture(scope="module")
def train_draws(sample_shards):
    """Outputs of 9 debug batches (432 draws, 3 epochs of the 144 samples) and the stats."""
    spec, pipe = debug_pipeline(sample_shards, sigma=0.5)
    return spec.stats, list(samples(run_batches(pipe, 9)))


def test_lighting_formula_matches_spec_units(sample_shards):
    """offset in 0..255 units == 255 x the SPEC's 0..1 formula with eigval rescaled to 0..1 pixels."""
    stats = load_stats(load(sample_shards).stats_path)
    alpha = np.array([0.3, -1.2, 0.7])
    eigval01 = stats.eigval / 255.0**2
    spec = 255.0 * np.array([sum(stats.eigvec[i][j] * alpha[j] * eigval01[j] for j in range(3)) for i in range(3)])
    np.testing.assert_allclose(lighting_offset(stats, alpha), spec, rtol=1e-5)
    np.testing.assert_allclose(lighting_offset(stats, alpha), stats.eigvec @ (alpha * stats.eigval / 255), rtol=1e-5)


def test_train_output_equals_numpy_augmentation(train_draws):
    """Each image == (decoded - mean image) cropped at the drawn anchor, flipped, + L @ alpha."""
    stats, draws = train_draws
    centered = None
    for image, label, ident, decoded, px, py, mirror, alpha in draws:
        assert image.shape == (3, CROP, CROP) and image.dtype == np.float32
        assert label.dtype == np.int64 and ident.dtype == np.int64
        x0, y0 = px.item() * 32, py.item() * 32
        assert x0 == int(x0) and y0 == int(y0)
        centered = decoded.astype(np.float32) - stats.mean_image
        expected = crop_hwc(centered, int(x0), int(y0), CROP, bool(mirror)) + lighting_offset(stats, alpha)
        np.testing.assert_allclose(image, expected.transpose(2, 0, 1), atol=2e-3)
    assert centered is not None


def test_crop_positions_cover_every_anchor_and_flip_is_fair(train_draws):
    _, draws = train_draws
    xs = {round(d[4].item() * 32) for d in draws}
    ys = {round(d[5].item() * 32) for d in draws}
    assert xs == set(range(33)) and ys == set(range(33))
    flips = np.array([d[6].item() for d in draws])
    assert set(flips) <= {0, 1}
    assert abs(flips.mean() - 0.5) < 0.1  # 432 draws: 4 standard deviations


def test_lighting_offset_covariance_matches_theory(train_draws):
    """Offsets recovered from the output pixels have covariance sigma^2 L L^T (sigma = 0.5 here)."""
    stats, draws = train_draws
    offsets = []
    for image, _, _, decoded, px, py, mirror, _ in draws:
        centered = decoded.astype(np.float32) - stats.mean_image
        base = crop_hwc(centered, round(px.item() * 32), round(py.item() * 32), CROP, bool(mirror))
        offsets.append((image - base.transpose(2, 0, 1)).reshape(3, -1).mean(axis=1))
    offsets = np.array(offsets)
    theory = lighting_covariance(stats, 0.5)
    measured = np.cov(offsets.T)
    # 432 draws: each entry within ~25% of the largest one; the mean is zero.
    assert np.abs(measured - theory).max() < 0.25 * np.abs(theory).max()
    assert np.abs(offsets.mean(axis=0)).max() < 4 * np.sqrt(np.diag(theory).max() / len(offsets))


def test_channel_mode_normalizes_per_channel(sample_shards):
    spec, pipe = debug_pipeline(sample_shards, normalize="channel")
    stats = spec.stats
    for image, _, _, decoded, px, py, mirror, alpha in list(samples(run_batches(pipe, 1)))[:8]:
        crop = crop_hwc(decoded.astype(np.float32), round(px.item() * 32), round(py.item() * 32), CROP, bool(mirror))
        expected = (crop + lighting_offset(stats, alpha) - stats.mean) / stats.std
        np.testing.assert_allclose(image, expected.transpose(2, 0, 1), atol=1e-4)


def test_labels_and_ids_match_the_tars(sample_shards):
    truth = tar_labels(sample_shards, "train")
    _, pipe = debug_pipeline(sample_shards, shuffle_shards=False)
    seen = [(int(s[2][0]), int(s[1][0])) for s in samples(run_batches(pipe, 3))][:144]
    assert {i for i, _ in seen} == set(truth)
    assert all(truth[i] == label for i, label in seen)


@pytest.mark.parametrize("views", [1, 10])
def test_eval_views_equal_numpy_slices(sample_shards, views):
    spec, pipe = debug_pipeline(sample_shards, train=False, views=views)
    for image, _, _, decoded in samples(run_batches(pipe, 1)):
        expected = view_stack(decoded.astype(np.float32) - spec.stats.mean_image, CROP, views)
        expected = expected.transpose(0, 3, 1, 2)
        np.testing.assert_allclose(image.reshape(expected.shape), expected, atol=1e-3)
        assert image.shape == ((3, CROP, CROP) if views == 1 else (10, 3, CROP, CROP))


def test_missing_index_fails_early(sample_shards, tmp_path):
    import shutil

    from pipeline import build_train_loader
    from shards.manifest import ManifestError

    with pytest.raises(ManifestError, match="manifest.json"):
        build_train_loader(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(sample_shards, copy)
    victim = next((copy / "train").glob("*.idx"))
    victim.unlink()
    with pytest.raises(ManifestError, match=victim.name):
        build_train_loader(copy)
