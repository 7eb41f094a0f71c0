"""The DALI graphs (CPU-only mode): uint8 crops and draws, and every augmentation against numpy.
(The labels and ids: ``tests/test_pipeline_labels.py``.)"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import LoaderConfig
from pipeline.normalize import DeviceNormalizer
from pipeline.stats import lighting_covariance, lighting_offset, load_stats
from pipeline.views import crop_hwc, view_stack
from shards.manifest import load
from tests.conftest import run_module

CROP = 224


def debug_pipeline(shards: Path, train: bool = True, views: int = 1, **cfg):
    from pipeline import _spec
    from pipeline.graph import build_pipeline

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
    """Outputs of 9 debug batches (432 draws, 3 epochs of the 144 samples) and the stats.

    Per sample: crop (224, 224, 3) uint8, label bytes, id bytes, anchors (x, y), mirror, alpha,
    and the full decode of the same JPEG."""
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


def test_crop_window_decode_equals_slicing_the_full_decode(train_draws):
    """``decoders.image_slice`` decodes only the window; it must equal numpy slicing of the full
    decode (the flip is the normaliser's).  Measured: bit-identical on these shards."""
    _, draws = train_draws
    for crop, _, _, anchors, mirror, _, decoded in draws:
        assert crop.shape == (CROP, CROP, 3) and crop.dtype == np.uint8 and anchors.dtype == np.int32
        x0, y0 = (int(v) for v in anchors)
        np.testing.assert_array_equal(crop, crop_hwc(decoded, x0, y0, CROP, False))


def test_fast_idct_stays_within_a_few_levels_of_the_accurate_one(sample_shards):
    """Training decodes with libjpeg-turbo's fast IDCT (LoaderConfig.fast_idct): bound the cost."""
    from nvidia.dali import fn, pipeline_def, types

    split = load(sample_shards).splits["train"]

    @pipeline_def(batch_size=48, num_threads=2, device_id=None)
    def both():
        jpg = fn.readers.webdataset(paths=[str(s.tar) for s in split.shards], index_paths=[str(s.index) for s in split.shards],
                                    ext=["jpg"], missing_component_behavior="error")
        return (fn.decoders.image(jpg, device="cpu", output_type=types.RGB),
                fn.decoders.image(jpg, device="cpu", output_type=types.RGB, use_fast_idct=True))

    pipe = both()
    pipe.build()
    accurate, fast = pipe.run()
    diff = np.concatenate([np.abs(np.array(a, np.int16) - np.array(f, np.int16)).ravel() for a, f in zip(accurate, fast)])
    assert diff.mean() < 1.5 and diff.max() <= 16, (diff.mean(), diff.max())


def test_loader_output_equals_numpy_augmentation(train_draws):
    """DALI window + draws through the normaliser == (decoded - mean image) cropped at the drawn
    anchor, flipped if drawn, + L @ alpha (SPEC section 4), float32 CHW."""
    stats, draws = train_draws
    normalizer = DeviceNormalizer(stats, LoaderConfig())
    for crop, _, _, anchors, mirror, alpha, decoded in draws[:40]:
        image = normalizer(torch.from_numpy(crop[None]), torch.from_numpy(anchors[None]),
                           torch.from_numpy(mirror.reshape(1)), torch.from_numpy(alpha[None]))[0]
        x0, y0 = (int(v) for v in anchors)
        centered = decoded.astype(np.float32) - stats.mean_image
        expected = crop_hwc(centered, x0, y0, CROP, bool(mirror)) + lighting_offset(stats, alpha)
        np.testing.assert_allclose(image.numpy(), expected.transpose(2, 0, 1), atol=2e-3)


def test_crop_positions_cover_every_anchor_and_flip_is_fair(train_draws):
    _, draws = train_draws
    xs = {int(d[3][0]) for d in draws}
    ys = {int(d[3][1]) for d in draws}
    assert xs == set(range(33)) and ys == set(range(33))
    flips = np.array([d[4].item() for d in draws])
    assert set(flips) <= {0, 1}
    assert abs(flips.mean() - 0.5) < 0.1  # 432 draws: 4 standard deviations


def test_lighting_offset_covariance_matches_theory(train_draws):
    """DALI's alpha draws, through the normaliser: the offsets recovered from the output pixels
    have covariance sigma^2 L L^T (sigma = 0.5 here) and mean zero."""
    stats, draws = train_draws
    normalizer = DeviceNormalizer(stats, LoaderConfig(sigma=0.5))
    crops = torch.from_numpy(np.stack([d[0] for d in draws]))
    anchors, mirror = torch.from_numpy(np.stack([d[3] for d in draws])), torch.tensor([int(d[4]) for d in draws])
    alpha = torch.from_numpy(np.stack([d[5] for d in draws]))
    offsets = (normalizer(crops, anchors, mirror, alpha) - normalizer(crops, anchors, mirror)).mean(dim=(2, 3))
    offsets = offsets.double().numpy()
    theory = lighting_covariance(stats, 0.5)
    measured = np.cov(offsets.T)
    # 432 draws: each entry within ~25% of the largest one; the mean is zero.
    assert np.abs(measured - theory).max() < 0.25 * np.abs(theory).max()
    assert np.abs(offsets.mean(axis=0)).max() < 4 * np.sqrt(np.diag(theory).max() / len(offsets))


@pytest.mark.parametrize("views,crop", [(1, 224), (10, 224), (1, 227), (10, 227)])
def test_eval_views_equal_numpy_slices(sample_shards, views, crop):
    """The uint8 view windows DALI cuts from the full decode are exactly numpy's slices; through
    the normaliser they are the views of (decoded - mean image), flips included.  crop=227 puts
    the centre anchor on a half pixel (14.5), where DALI's and Python's rounding used to differ."""
    spec, pipe = debug_pipeline(sample_shards, train=False, views=views, crop=crop)
    normalizer = DeviceNormalizer(spec.stats, spec.cfg)
    for image, _, _, decoded in list(samples(run_batches(pipe, 1)))[:6]:
        expected = view_stack(decoded, crop, views, flip=False)
        assert image.dtype == np.uint8
        assert image.shape == ((crop, crop, 3) if views == 1 else (10, crop, crop, 3))
        np.testing.assert_array_equal(image.reshape(expected.shape), expected)
        out = normalizer.views(torch.from_numpy(image[None]), views)[0].numpy()
        centered = view_stack(decoded.astype(np.float32) - spec.stats.mean_image, crop, views).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(out.reshape(centered.shape), centered, atol=1e-3)


def test_view_anchors_are_integers_with_halves_rounded_up():
    from pipeline.views import view_anchors

    assert view_anchors(1, 256, 256, 227) == [(15, 15, 0)]  # 0.5 * 29 = 14.5 -> 15
    ten = view_anchors(10, 256, 300, 224)
    assert ten[:5] == [(0, 0, 0), (76, 0, 0), (0, 32, 0), (76, 32, 0), (38, 16, 0)]
    assert [(x, y) for x, y, _ in ten[5:]] == [(x, y) for x, y, _ in ten[:5]] and {m for *_, m in ten[5:]} == {1}
    with pytest.raises(ValueError, match="does not fit"):
        view_anchors(1, 256, 256, 257)


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


@pytest.mark.parametrize("args, code, said", [
    (["--count", "0"], 2, "argument --count: must be at least 1, got 0"),
    (["--cols", "0"], 2, "argument --cols: must be at least 1, got 0"),
    (["--sigma", "nan"], 2, "preview: --sigma must be a finite number >= 0, got nan"),
    (["--sigma", "1e6"], 2, "preview: --sigma must be at most 10 (the paper's 0.1 x 100"),
    (["--out", "{tmp}"], 1, "preview: cannot write {tmp} (Is a directory)"),
    (["--shards", "{tmp}/none"], 1, "preview: {tmp}/none does not exist; (re)create it with `make shards"),
    (["--count", "1025"], 2, "argument --count: must be 1..1024 (the images drawn at once"),
], ids=["count 0", "cols 0", "sigma nan", "sigma past the most", "out a directory", "no shards", "count past the most"])
def test_preview_bad_input_is_one_line(sample_shards, tmp_path, args, code, said):
    """``--cols 0`` was a ZeroDivisionError, the others a ValueError or OSError traceback.  A
    ``--count`` of 100000 was one batch of that size, killed by the kernel for its memory (exit 137),
    no line; 1025 was written (the test's case: the bound, without the memory)."""
    args = [a.format(tmp=tmp_path) for a in args]
    result = run_module("pipeline.preview", "--shards", str(sample_shards), "--out", str(tmp_path / "p.png"), *args,
                        check=False)
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
    assert said.format(tmp=tmp_path) in result.stderr.strip().splitlines()[-1], result.stderr
    assert not (tmp_path / "p.png").exists()


def test_preview_writes_a_png_whatever_the_name_and_no_empty_columns(sample_shards, tmp_path):
    """``--out`` without ``.png`` was "unknown file extension"; ``--cols`` past ``--count`` drew
    a canvas of empty columns."""
    from PIL import Image

    out = tmp_path / "preview"
    result = run_module("pipeline.preview", "--shards", str(sample_shards), "--out", str(out), "--count", "3",
                        "--cols", "8", check=False)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == (3 * (CROP + 4) + 4, CROP + 8)


@pytest.mark.parametrize("under", ["p.png", "sub/p.png"], ids=["File exists", "Not a directory"])
def test_preview_out_under_a_file_is_one_line_naming_the_file(sample_shards, tmp_path, under):
    """``--out file/p.png`` where ``file`` is a file said only "cannot write file/p.png (File
    exists)" (``file/sub/p.png``: "Not a directory"), mkdir's error text, which reads as if p.png
    were in the way.  Now the line names the file that is in the way and what to do."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    out = blocker / under
    result = run_module("pipeline.preview", "--shards", str(sample_shards), "--out", str(out), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"preview: cannot write {out}: {blocker} is a file, not a directory: choose another --out, "
        "or move the file away"], result.stderr
    assert blocker.read_text() == "not a folder"


def test_preview_says_when_the_split_holds_fewer_images_than_count(sample_shards, tmp_path):
    """``--count`` past the train split's size wrote the split's images (one epoch) and said only
    "wrote p.png (144 augmented training images)", nothing about the 200 asked for.  Refusing would
    make a user find the split's size first; the grid of all of them is what was meant, so the
    line says it, and the batch drawn is the split's size (no padding decoded)."""
    from PIL import Image

    out = tmp_path / "p.png"
    result = run_module("pipeline.preview", "--shards", str(sample_shards), "--out", str(out), "--count", "200",
                        check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        f"wrote {out} (144 augmented training images: all the train split holds, fewer than --count 200)"]
    with Image.open(out) as picture:
        assert picture.size == (8 * (CROP + 4) + 4, 18 * (CROP + 4) + 4)


def test_preview_of_a_damaged_jpeg_is_one_line_naming_the_shard_and_the_sample(sample_shards, tmp_path):
    """JPEGs cut short in a shard after ``make shards`` wrote it (the rest of each zeros: the tar
    keeps its size and its index) ended the preview in DALI's traceback of many lines.  Now one
    last line naming the shard, the sample and what to do, exit 1 (the decoder's own C++ log lines
    about the bad data may come before it).  Bytes no codec recognises at all (a garbled header,
    ``nvImageCodec failure``) are named by checking the shards' checksums, but DALI 1.x itself may
    die of SIGSEGV then, before or after that line: not tested here."""
    import shutil
    import tarfile

    copy = tmp_path / "shards"
    shutil.copytree(sample_shards, copy)
    tar = copy / "train" / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as archive:
        for member in archive:
            if member.name.endswith(".jpg"):  # every image of the shard: the first batch holds some
                start, end = member.offset_data + member.size // 8, member.offset_data + member.size
                data[start:end] = bytes(end - start)
    tar.write_bytes(data)
    result = run_module("pipeline.preview", "--shards", str(copy), "--out", str(tmp_path / "p.png"), "--count", "144",
                        check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"preview: train shard {tar}: sample train-"), line
    assert "does not decode as a JPEG; re-create the shards (make shards SRC=<imagenet> OUT=" in line, line
    assert not (tmp_path / "p.png").exists()


def test_preview_help_says_what_it_draws_whole() -> None:
    """``--help`` took the docstring's first line only and cut its sentence off ("a grid of
    augmented training")."""
    said = " ".join(run_module("pipeline.preview", "--help").stdout.split())
    assert "a grid of augmented training images (crop, flip, lighting; before the mean subtraction), so a person " \
           "can check the augmentation by looking." in said, said
