"""The device normaliser (the float half of both loaders) against numpy, on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import LoaderConfig
from pipeline.labels import ascii_ints, key_numbers
from pipeline.normalize import DeviceNormalizer
from pipeline.stats import DatasetStats, lighting_covariance, lighting_offset
from pipeline.views import crop_hwc, view_stack

CROP, SIZE = 224, 256


@pytest.fixture(scope="module")
def stats() -> DatasetStats:
    """Synthetic statistics with a non-symmetric mean image (so a wrong flip or anchor shows)."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return DatasetStats(mean=np.array([120.0, 110.0, 100.0], np.float32), std=np.array([60.0, 55.0, 58.0], np.float32),
                        eigval=np.array([5000.0, 300.0, 40.0]), eigvec=q,
                        mean_image=(rng.random((SIZE, SIZE, 3)) * 255).astype(np.float32))


def draws(n: int, seed: int = 1):
    """Full images, their crop windows at random anchors (not flipped: the normaliser flips
    where ``mirror``), the flips and the lighting draws."""
    rng = np.random.default_rng(seed)
    full = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    anchors = rng.integers(0, SIZE - CROP + 1, (n, 2))
    anchors[:4] = [[0, 0], [32, 32], [0, 32], [32, 0]]  # the extremes, both orientations below
    mirror = np.arange(n) % 2
    alpha = rng.normal(0, 0.5, (n, 3)).astype(np.float32)
    crops = np.stack([crop_hwc(f, x, y, CROP, False) for f, (x, y) in zip(full, anchors)])
    return full, crops, anchors, mirror, alpha


def numpy_mean_image(stats, full, anchors, mirror, alpha) -> np.ndarray:
    """SPEC section 4 in numpy: crop/flip of (image - mean image) + L @ alpha, CHW."""
    out = [crop_hwc(f.astype(np.float32) - stats.mean_image, x, y, CROP, bool(m)) + lighting_offset(stats, a)
           for f, (x, y), m, a in zip(full, anchors, mirror, alpha)]
    return np.stack(out).transpose(0, 3, 1, 2)


def run(normalizer, crops, anchors, mirror, alpha) -> torch.Tensor:
    return normalizer(torch.from_numpy(crops), torch.from_numpy(anchors), torch.from_numpy(mirror),
                      None if alpha is None else torch.from_numpy(alpha))


def test_mean_image_mode_equals_numpy_at_every_anchor_and_flip(stats):
    full, crops, anchors, mirror, alpha = draws(12)
    out = run(DeviceNormalizer(stats, LoaderConfig()), crops, anchors, mirror, alpha)
    assert out.shape == (12, 3, CROP, CROP) and out.dtype == torch.float32 and out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), numpy_mean_image(stats, full, anchors, mirror, alpha), atol=1e-3)


def test_gpu_path_is_bit_identical_to_cpu_path(stats):
    """The batched gather (used on CUDA) and the per-sample CPU path do the same arithmetic."""
    _, crops, anchors, mirror, alpha = draws(6)
    for mode in ("mean_image", "channel"):
        norm = DeviceNormalizer(stats, LoaderConfig(normalize=mode))
        offset = norm.offset(torch.from_numpy(alpha))
        batched = norm._batched(torch.from_numpy(crops), torch.from_numpy(anchors), torch.from_numpy(mirror), offset)
        assert torch.equal(batched, run(norm, crops, anchors, mirror, alpha)), mode


def test_lighting_with_fixed_draws_is_eigvec_alpha_eigval(stats):
    """A constant image: every pixel of channel i moves by eigvec[i] . (alpha * eigval) / 255."""
    alpha = np.array([[0.3, -1.2, 0.7]], np.float32)
    crops = np.full((1, CROP, CROP, 3), 128, np.uint8)
    norm = DeviceNormalizer(stats, LoaderConfig())
    lit = run(norm, crops, np.array([[5, 9]]), np.array([1]), alpha)
    dark = run(norm, crops, np.array([[5, 9]]), np.array([1]), None)
    shift = (lit - dark).reshape(3, -1)
    expected = stats.eigvec @ (alpha[0] * stats.eigval / 255.0)
    np.testing.assert_allclose(shift.mean(1).numpy(), expected, atol=1e-3)
    assert float((shift - shift.mean(1, keepdim=True)).abs().max()) < 1e-3


def test_lighting_covariance_over_many_draws(stats):
    norm = DeviceNormalizer(stats, LoaderConfig())
    alpha = np.random.default_rng(3).normal(0, 0.5, (4000, 3)).astype(np.float32)
    offsets = norm.offset(torch.from_numpy(alpha)).numpy()
    theory = lighting_covariance(stats, 0.5)
    assert np.abs(np.cov(offsets.T) - theory).max() < 0.1 * np.abs(theory).max()


def test_channel_mode_equals_numpy(stats):
    full, crops, anchors, mirror, alpha = draws(6)
    out = run(DeviceNormalizer(stats, LoaderConfig(normalize="channel")), crops, anchors, mirror, alpha)
    flipped = np.stack([c[:, ::-1] if m else c for c, m in zip(crops, mirror)]).astype(np.float32)
    expected = (flipped + lighting_offset(stats, alpha)[:, None, None] - stats.mean) / stats.std
    np.testing.assert_allclose(out.numpy(), expected.transpose(0, 3, 1, 2), atol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes_round_the_float32_result(stats, dtype):
    full, crops, anchors, mirror, alpha = draws(4)
    out = run(DeviceNormalizer(stats, LoaderConfig(dtype=dtype)), crops, anchors, mirror, alpha)
    ref = run(DeviceNormalizer(stats, LoaderConfig()), crops, anchors, mirror, alpha)
    assert out.dtype == getattr(torch, dtype)
    assert torch.equal(out, ref.to(out.dtype))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["mean_image", "channel"])
def test_channels_last_output_equals_the_nchw_float32_path(stats, mode, dtype):
    """``memory_format="channels_last"`` (the model's layout, optionally its dtype): NHWC memory,
    the same values as the float32 NCHW batch after the cast, on the CPU path and on the batched
    (GPU) path."""
    _, crops, anchors, mirror, alpha = draws(6)
    ref = run(DeviceNormalizer(stats, LoaderConfig(normalize=mode)), crops, anchors, mirror, alpha)
    norm = DeviceNormalizer(stats, LoaderConfig(normalize=mode, dtype=dtype, memory_format="channels_last"))
    out = run(norm, crops, anchors, mirror, alpha)
    assert out.shape == ref.shape and out.dtype == getattr(torch, dtype)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.equal(out, ref.to(out.dtype))
    offset = norm.offset(torch.from_numpy(alpha))
    batched = norm._batched(torch.from_numpy(crops), torch.from_numpy(anchors), torch.from_numpy(mirror), offset)
    assert batched.is_contiguous(memory_format=torch.channels_last) and torch.equal(batched, ref)


def test_channels_last_eval_views(stats):
    full = np.random.default_rng(5).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    crops = torch.from_numpy(np.stack([view_stack(f, CROP, 10, flip=False) for f in full]))
    ref = DeviceNormalizer(stats, LoaderConfig()).views(crops, 10)
    out = DeviceNormalizer(stats, LoaderConfig(memory_format="channels_last")).views(crops, 10)
    assert out.shape == ref.shape == (2, 10, 3, CROP, CROP) and torch.equal(out, ref)
    assert out.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("views", [1, 10])
def test_eval_views_equal_numpy(stats, views):
    full = np.random.default_rng(4).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    crops = np.stack([view_stack(f, CROP, views, flip=False) for f in full])
    crops = crops[:, 0] if views == 1 else crops
    out = DeviceNormalizer(stats, LoaderConfig()).views(torch.from_numpy(crops), views)
    expected = np.stack([view_stack(f.astype(np.float32) - stats.mean_image, CROP, views) for f in full])
    expected = expected.transpose(0, 1, 4, 2, 3)
    np.testing.assert_allclose(out.numpy(), expected[:, 0] if views == 1 else expected, atol=1e-3)


def test_empty_batch(stats):
    out = DeviceNormalizer(stats, LoaderConfig())(torch.zeros(0, CROP, CROP, 3, dtype=torch.uint8),
                                                  torch.zeros(0, 2), torch.zeros(0), torch.zeros(0, 3))
    assert out.shape == (0, 3, CROP, CROP)


def test_label_and_id_bytes_parse():
    rows = np.zeros((4, 8), np.uint8)
    for i, text in enumerate([b"0", b"7", b"123\n", b"999999"]):
        rows[i, :len(text)] = np.frombuffer(text, np.uint8)
    assert ascii_ints(rows).tolist() == [0, 7, 123, 999999]
    info = [b"/d/train/train-000003.tar:1536:train-00000042.jpg", b"x.tar:0:val-00000007.jpg"]
    padded = np.zeros((2, 64), np.uint8)
    for i, text in enumerate(info):
        padded[i, :len(text)] = np.frombuffer(text, np.uint8)
    assert key_numbers(padded).tolist() == [42, 7]


def test_cpu_output_memory_is_reused_only_after_release(stats):
    """A held batch (or a view of it) is never overwritten; a released one is recycled."""
    _, crops, anchors, mirror, alpha = draws(4)
    norm = DeviceNormalizer(stats, LoaderConfig())
    first = run(norm, crops, anchors, mirror, alpha)
    kept, ptr = first.clone(), first.data_ptr()
    view = first[1:]
    del first
    second = run(norm, crops[::-1].copy(), anchors, mirror, alpha)
    assert second.data_ptr() != ptr and torch.equal(view, kept[1:])
    del view, second
    third = run(norm, crops, anchors, mirror, alpha)
    assert third.data_ptr() == ptr and torch.equal(third, kept)
