"""The embedded sample dataset: ImageNet's layout and quirks, deterministic, learnable but not by colour."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sampledata.generate import SampleConfig, generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("default-sample")
    generate(SampleConfig(out=out))
    return out


@pytest.mark.slow
def test_layout_sizes_and_quirks(default_sample: Path) -> None:
    train = sorted(default_sample.glob("train/*/*.JPEG"))
    val = sorted(default_sample.glob("val/*/*.JPEG"))
    assert len(train) == 12 * 60 and len(val) == 12 * 10
    assert all(p.name.startswith(p.parent.name + "_") for p in train)
    assert all(p.name.startswith("ILSVRC2012_val_") for p in val)
    classes = sorted(p.name for p in (default_sample / "train").iterdir())
    assert classes == sorted(p.name for p in (default_sample / "val").iterdir()) and len(classes) == 12
    kinds = {}
    sizes = []
    for p in train + val:
        with Image.open(p) as img:
            kinds.setdefault((img.format, img.mode), []).append(p)
            sizes.append(img.size)
    assert len(kinds[("JPEG", "CMYK")]) == 1 and len(kinds[("PNG", "RGB")]) == 1 and len(kinds[("JPEG", "L")]) == 1
    long_sides = np.array([max(s) for s in sizes])
    assert np.median(long_sides) == pytest.approx(460, abs=60), "ImageNet-like: about 500x375"
    assert 0.05 < np.mean(long_sides > 1000) < 0.2, "some images above 1000 px"


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    small = dict(classes=3, train_per_class=3, val_per_class=1)
    trees = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate(SampleConfig(out=tmp_path / name, seed=seed, **small))
        trees.append({str(p.relative_to(tmp_path / name)): p.read_bytes()
                      for p in sorted((tmp_path / name).rglob("*.JPEG"))})
    assert trees[0] == trees[1]
    assert trees[0].keys() == trees[2].keys() and trees[0] != trees[2]


def _features(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(mean colour, a colour-blind texture descriptor: gradient orientation and magnitude histograms)."""
    img = Image.open(path)
    img.draft("RGB", (128, 128))
    a = np.asarray(img.convert("RGB").resize((64, 64)), dtype=np.float64)
    gray = a.mean(axis=2)
    gray = (gray - gray.mean()) / (gray.std() + 1e-6)
    gx, gy = np.diff(gray, axis=1)[:-1], np.diff(gray, axis=0)[:, :-1]
    mag = np.hypot(gx, gy)
    orient = np.histogram(np.arctan2(gy, gx), bins=8, range=(-np.pi, np.pi), weights=mag)[0]
    strength = np.histogram(mag, bins=8, range=(0, 4))[0]
    return a.mean(axis=(0, 1)), np.concatenate([orient / orient.sum(), strength / strength.sum()])


def _nearest_centroid_accuracy(train: np.ndarray, ytrain: np.ndarray, val: np.ndarray, yval: np.ndarray) -> float:
    mu, sd = train.mean(0), train.std(0) + 1e-9
    train, val = (train - mu) / sd, (val - mu) / sd
    centroids = np.stack([train[ytrain == c].mean(0) for c in np.unique(ytrain)])
    guess = ((val[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((guess == yval).mean())


@pytest.mark.slow
def test_learnable_but_not_from_mean_colour(default_sample: Path) -> None:
    data = {}
    for split in ("train", "val"):
        paths = sorted(default_sample.glob(f"{split}/*/*.JPEG"))
        labels = np.array([sorted(p.name for p in (default_sample / split).iterdir()).index(p.parent.name) for p in paths])
        colour, texture = zip(*(_features(p) for p in paths))
        data[split] = (np.array(colour), np.array(texture), labels)
    (c_tr, t_tr, y_tr), (c_va, t_va, y_va) = data["train"], data["val"]
    chance = 1 / 12
    by_colour = _nearest_centroid_accuracy(c_tr, y_tr, c_va, y_va)
    by_texture = _nearest_centroid_accuracy(t_tr, y_tr, t_va, y_va)
    assert by_colour < 0.45, f"mean colour alone gives {by_colour:.0%}: the colour shifts are too weak"
    assert by_texture > 0.7 and by_texture > 8 * chance, f"a colour-blind texture feature gives only {by_texture:.0%}"


def _few_files() -> None:
    """A child's open-file limit of 64: should the writer start forking its workers anyway, it
    stops at a few dozen, not at the number asked for."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


@pytest.mark.parametrize("flag, value, said", [
    ("classes", "0", "classes must be 2..12 (one per embedded photo), got 0"),  # was a ValueError traceback
    ("workers", "-1", "workers must be in 0..1024 (0 = one per core), got -1"),  # was a ValueError traceback
    ("seed", "-1", "seed must be >= 0, got -1"),  # was numpy's "expected non-negative integer" traceback
    ("train_per_class", "0", "train_per_class must be >= 1, got 0"),  # was FileNotFoundError: synset_words.txt
    ("val_per_class", "-1", "val_per_class must be >= 1, got -1"),  # wrote no val split, exit 0
    ("large_fraction", "nan", "large_fraction must be in [0, 1], got nan"),  # no large image, exit 0
    # forked a process per worker until the open files ran out (here: 64, see _few_files)
    ("workers", "100000", "workers must be in 0..1024 (0 = one per core), got 100000"),
])
def test_a_bad_setting_is_one_line_exit_2_and_writes_nothing(flag: str, value: str, said: str, tmp_path: Path) -> None:
    out = tmp_path / "sample"
    result = subprocess.run([sys.executable, "-m", "sampledata", "--out", str(out), f"--{flag}", value], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=_few_files)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"sampledata: {said}\n"
    assert not out.exists()


def _sampledata(*args: str | Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sampledata", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


SMALL = ("--train_per_class", "1", "--val_per_class", "1")


def test_other_settings_into_a_written_dataset_are_refused_not_mixed_in(tmp_path: Path) -> None:
    """A second run with fewer classes into the same folder wrote its files over the first's and
    left the rest: 3 class folders on disk under a marker and synset_words.txt of 2 classes, which
    make shards then read as a 3-class dataset with an unnamed class. Now one line, exit 2, the
    first dataset as it was; the same settings again (a finished or an interrupted run) still work."""
    out = tmp_path / "sample"
    assert _sampledata("--out", out, "--classes", "3", *SMALL).returncode == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    again = _sampledata("--out", out, "--classes", "2", *SMALL)
    assert again.returncode == 2, again.stderr
    assert again.stderr.startswith(f"sampledata: {out} already holds ") and again.stderr.count("\n") == 1, again.stderr
    assert "Traceback" not in again.stderr and f"rm -r {out}" in again.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    (out / ".complete").rename(out / ".writing")  # as a run cut short leaves it: the same settings finish it
    redone = _sampledata("--out", out, "--classes", "3", *SMALL)
    assert redone.returncode == 0 and "wrote 6 images" in redone.stdout, redone.stderr


@pytest.mark.parametrize("where", ["under-a-file", "no-wheel", "bad-wheel"])
def test_an_unwritable_output_or_a_missing_wheel_is_one_line_exit_1(where: str, tmp_path: Path) -> None:
    """All were a traceback: NotADirectoryError from mkdir under a file; FileNotFoundError with
    make setup's advice buried in the traceback's last line; zipfile.BadZipFile (a download cut short)."""
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sample" if where == "under-a-file" else tmp_path / "sample"
    if where == "bad-wheel":
        (tmp_path / "scikit_image-0.1-py3-none-any.whl").write_text("cut short")
    env = {"SAMPLEDATA_WHEELS": str(tmp_path)} if where != "under-a-file" else None
    done = _sampledata("--out", out, "--classes", "2", *SMALL, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    said = {"under-a-file": f"cannot write {out}", "no-wheel": "no scikit-image wheel in",
            "bad-wheel": f"{tmp_path / 'scikit_image-0.1-py3-none-any.whl'}: not a readable scikit-image wheel"}[where]
    assert done.stderr.startswith(f"sampledata: {said}") and ("make setup" in done.stderr) == (where != "under-a-file")
