"""Generate the embedded sample dataset: ImageNet's layout and quirks, from real photos.

Each class is one photograph; its images are random crops at random scales and aspect
ratios, flipped, colour-shifted and resized to ImageNet-like sizes (about 500x375, some
over 1000 px).  The colour shift is strong enough that mean colour alone does not give
the class away; the texture and shapes of the photo do.  The train split also carries
ImageNet's real quirks: a CMYK JPEG, a PNG saved under a ``.JPEG`` name and a grayscale JPEG.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from common.config import ConfigError
from common.progress import progress
from sampledata.photos import PHOTOS, load_photos
from shards.config import MAX_WORKERS


@dataclass(frozen=True)
class SampleConfig:
    """Settings of ``python -m sampledata`` (TOML file and/or ``--key value`` flags)."""

    out: Path = Path("data/sample")
    classes: int = 12
    train_per_class: int = 60
    val_per_class: int = 10
    seed: int = 0
    large_fraction: float = 0.1  # share of images above 1000 px on the long side
    workers: int = 1  # processes writing images (0 = one per core; at most 1024); the output does not depend on it

    def validate(self) -> SampleConfig:
        """Return self if every setting can work, else ``ConfigError`` naming it: each was a
        traceback at some point of the writing, or (no val split, no large image) a dataset other
        than the one asked for, written without a word."""
        if not 2 <= self.classes <= len(PHOTOS):
            raise ConfigError(f"classes must be 2..{len(PHOTOS)} (one per embedded photo), got {self.classes}")
        for key, least in (("train_per_class", 1), ("val_per_class", 1), ("seed", 0)):
            if getattr(self, key) < least:
                raise ConfigError(f"{key} must be >= {least}, got {getattr(self, key)}")
        if not 0 <= self.workers <= MAX_WORKERS:  # more forked one process each until the open files ran out
            raise ConfigError(f"workers must be in 0..{MAX_WORKERS} (0 = one per core), got {self.workers}")
        if not 0 <= self.large_fraction <= 1:  # nan too: nan <= 1 is False
            raise ConfigError(f"large_fraction must be in [0, 1], got {self.large_fraction}")
        return self


def wnid_of(index: int) -> str:
    """A WordNet-shaped id for sample class ``index`` (``n`` + 8 digits, sorted like the classes)."""
    return f"n9{index:07d}"


def _random_view(photo: Image.Image, rng: np.random.Generator, large: bool) -> Image.Image:
    """A random crop of ``photo`` (scale, aspect ratio, flip) resized to an ImageNet-like size."""
    w, h = photo.size
    area = w * h * rng.uniform(0.25, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, round(np.sqrt(area * aspect))))
    ch = int(min(h, round(np.sqrt(area / aspect))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    long_side = int(rng.integers(1001, 1400)) if large else int(rng.integers(400, 520))
    scale = long_side / max(cw, ch)
    size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
    view = photo.resize(size, Image.BICUBIC, box=(x, y, x + cw, y + ch))
    return view.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view


def _colour_shift(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Per-channel gains and offsets: every class spans many mean colours."""
    a = np.asarray(img, dtype=np.float32)
    gain = rng.uniform(0.45, 1.55, size=3)
    offset = rng.uniform(-50, 50, size=3)
    return Image.fromarray(np.clip(a * gain + offset, 0, 255).astype(np.uint8))


def _save(img: Image.Image, path: Path, quirk: str | None, rng: np.random.Generator) -> None:
    """Write a JPEG, or one of ImageNet's quirky files under a ``.JPEG`` name."""
    quality = int(rng.integers(75, 96))
    if quirk == "cmyk":
        img.convert("CMYK").save(path, "JPEG", quality=quality)
    elif quirk == "png":
        img.save(path, "PNG")
    elif quirk == "gray":
        img.convert("L").save(path, "JPEG", quality=quality)
    else:
        img.save(path, "JPEG", quality=quality)


# (split, class index, image number) of the files that carry ImageNet's quirks.
QUIRKS = {("train", 0, 0): "cmyk", ("train", 1, 0): "png", ("train", 2, 0): "gray"}


def _plan(cfg: SampleConfig) -> list[tuple[str, int, int, Path]]:
    """Every file to write: (split, class index, image number, relative path)."""
    plan = []
    val_number = 0
    for c in range(cfg.classes):
        wnid = wnid_of(c)
        for n in range(cfg.train_per_class):
            plan.append(("train", c, n, Path("train", wnid, f"{wnid}_{n}.JPEG")))
        for n in range(cfg.val_per_class):
            val_number += 1
            plan.append(("val", c, n, Path("val", wnid, f"ILSVRC2012_val_{val_number:08d}.JPEG")))
    return plan


def fingerprint(cfg: SampleConfig) -> str:
    """A hash of everything that determines the output (the output folder excluded)."""
    key = json.dumps([cfg.classes, cfg.train_per_class, cfg.val_per_class, cfg.seed, cfg.large_fraction,
                      sorted(QUIRKS.items())])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


_PHOTOS: list[tuple[str, Image.Image]] = []  # set before the pool forks, so never pickled


def _write(cfg: SampleConfig, item: tuple[str, int, int, Path]) -> None:
    """Write one planned file.  One generator per file: the output does not depend on the
    order of writing or on the number of workers."""
    split, c, n, rel = item
    rng = np.random.default_rng([cfg.seed, c, n, split == "val"])
    view = _random_view(_PHOTOS[c][1], rng, large=rng.random() < cfg.large_fraction)
    path = cfg.out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(_colour_shift(view, rng), path, QUIRKS.get((split, c, n)), rng)


def _write_chunk(args: tuple[SampleConfig, list]) -> int:
    cfg, items = args
    for item in items:
        _write(cfg, item)
    return len(items)


def _write_all(cfg: SampleConfig, plan: list, bar) -> None:
    """Every planned file, in ``cfg.workers`` processes (forked after the photos are loaded)."""
    workers = cfg.workers or len(os.sched_getaffinity(0))  # the cores this process may use
    if workers == 1:
        for item in plan:
            _write(cfg, item)
            bar.update()
        return
    chunks = [(cfg, plan[i:i + 32]) for i in range(0, len(plan), 32)]
    with get_context("fork").Pool(workers) as pool:
        for done in pool.imap_unordered(_write_chunk, chunks):
            bar.update(done)
        # The workers end on their own before the with's terminate(): that sends SIGTERM, and
        # where the signal is blocked or ignored (inherited from a parent) it hangs (~1 in 40).
        pool.close()
        pool.join()


def _refuse_other_dataset(cfg: SampleConfig) -> None:
    """``ConfigError`` when ``cfg.out`` already holds images that are not this dataset's: written
    with other settings (finished or cut short), or not by this command.  Written over, their files
    mixed with these (a run with fewer classes left the others' folders, and make shards read them
    as classes); removing them could delete a real dataset given as --out by mistake."""
    if not any((cfg.out / split).exists() for split in ("train", "val")):
        return
    marks = [m.read_text().strip() for m in (cfg.out / ".complete", cfg.out / WRITING) if m.is_file()]
    if fingerprint(cfg) not in marks:
        what = "a sample dataset written with other settings" if marks else "a train/ or val/ folder of another dataset"
        raise ConfigError(f"{cfg.out} already holds {what}: these images would mix with it; remove it "
                          f"(rm -r {cfg.out}) or give another --out")


WRITING = ".writing"  # the fingerprint of a dataset being written: a run cut short is finished by the same settings


def generate(cfg: SampleConfig) -> int:
    """Write the dataset under ``cfg.out``; returns the number of files.  Idempotent.
    ``ConfigError`` if ``cfg.out`` holds another dataset, ``OSError`` if it cannot be written."""
    marker = cfg.validate().out / ".complete"
    if marker.is_file() and marker.read_text().strip() == fingerprint(cfg):
        print(f"sampledata: {cfg.out} is already complete")
        return len(_plan(cfg))
    _refuse_other_dataset(cfg)
    _PHOTOS[:] = load_photos(cfg.classes)
    cfg.out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # a finished dataset of older settings' marker (the same files, checked above)
    (cfg.out / WRITING).write_text(fingerprint(cfg) + "\n")
    names = {wnid_of(c): name for c, (name, _) in enumerate(_PHOTOS)}
    plan = _plan(cfg)
    with progress(len(plan), "sample images") as bar:
        _write_all(cfg, plan, bar)
    (cfg.out / "synset_words.txt").write_text("".join(f"{w} {names[w]}\n" for w in sorted(names)))
    marker.write_text(fingerprint(cfg) + "\n")
    (cfg.out / WRITING).unlink()
    print(f"sampledata: wrote {len(plan)} images of {cfg.classes} classes to {cfg.out}")
    return len(plan)
