"""Dataset statistics for the augmentation: mean image, channel moments and the RGB PCA.

Computed from the training shards themselves (the exact pixels the pipeline will decode),
after they are written.  Units are raw 0..255 pixel values throughout.  Everything is a sum
over pixels kept in integers (int64), so partial sums add up exactly, in any grouping: the
images are split into chunks of ``chunk`` consecutive samples (read through the shards' DALI
index, so a chunk can start anywhere in a shard), one task each, on every worker, and the
statistics are byte-identical whatever the number of workers.  (Before, a task was a whole
shard: 20,000 images in 5,000-image shards kept at most 4 workers busy.)
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from shards.tarwriter import atomic_write_bytes
from shards.workers import Workers, checkpoint


@dataclass
class PixelMoments:
    """Running sums over images of one size: sum image, sum of x and of x x^T over pixels."""

    size: int = 256
    images: int = 0
    sum_image: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_outer: np.ndarray = field(default_factory=lambda: np.zeros((3, 3), np.int64))

    def __post_init__(self) -> None:
        if self.sum_image is None:
            self.sum_image = np.zeros((self.size, self.size, 3), np.int64)

    def add(self, rgb: np.ndarray) -> None:
        """Add one HxWx3 uint8 image (exactly: int64 overflows only past ~2 billion 256x256 images)."""
        if rgb.shape != (self.size, self.size, 3):
            raise ValueError(f"expected a {self.size}x{self.size}x3 image, got {rgb.shape}")
        x = rgb.reshape(-1, 3).astype(np.int64)
        self.sum_image += rgb
        self.sum_outer += x.T @ x
        self.images += 1

    def merge(self, other: PixelMoments) -> None:
        """Add another partial sum (integers: the result does not depend on the grouping)."""
        self.images += other.images
        self.sum_image += other.sum_image
        self.sum_outer += other.sum_outer

    def finish(self) -> dict:
        """Mean image, channel mean/std, covariance and its eigen-decomposition (descending)."""
        if self.images == 0:
            raise ValueError("no training images to compute statistics from")
        pixels = self.images * self.size * self.size
        mean_image = self.sum_image / self.images
        mean = mean_image.reshape(-1, 3).mean(axis=0)
        cov = self.sum_outer / pixels - np.outer(mean, mean)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = eigval[order], eigvec[:, order]
        # eigh's signs are arbitrary; fix them (largest component positive) so reruns compare equal.
        biggest = eigvec[np.abs(eigvec).argmax(axis=0), np.arange(3)]
        eigvec = eigvec * np.where(biggest < 0, -1.0, 1.0)
        return {
            "mean_image": mean_image,
            "mean": mean,
            "std": np.sqrt(np.diag(cov)),
            "covariance": cov,
            "eigval": eigval,
            "eigvec": eigvec,
        }


def _jpeg_spans(index: Path, first: int, count: int) -> list[tuple[int, int]]:
    """(offset, size) of the ``.jpg`` member of samples ``first .. first+count-1``, from a DALI index."""
    spans = []
    for line in index.read_text().splitlines()[1 + first:1 + first + count]:
        fields = line.split()
        for i in range(0, len(fields), 4):  # <ext> <offset> <size> <member name>
            if fields[i] == "jpg":
                spans.append((int(fields[i + 1]), int(fields[i + 2])))
    return spans


def chunk_moments(task: tuple[str, str, int, int]) -> PixelMoments:
    """Worker task: decode ``count`` images from sample ``first`` of one shard; their pixel sums."""
    tar, index, first, count = task
    moments: PixelMoments | None = None
    with open(tar, "rb") as f:
        for offset, size in _jpeg_spans(Path(index), first, count):
            f.seek(offset)
            rgb = np.asarray(Image.open(io.BytesIO(f.read(size))).convert("RGB"))
            moments = moments or PixelMoments(rgb.shape[0])
            moments.add(rgb)
            checkpoint()
    return moments or PixelMoments()


def chunks(shards: list[tuple[Path, Path, int]], images: int, chunk: int) -> list[tuple[str, str, int, int]]:
    """Tasks ``(tar, index, first, count)`` over the first ``images`` samples (0: all) of ``(tar, index, samples)``."""
    tasks, remaining = [], images or sum(n for *_, n in shards)
    for tar, index, samples in shards:
        for first in range(0, min(samples, remaining), chunk):
            tasks.append((str(tar), str(index), first, min(chunk, samples - first, remaining - first)))
        remaining -= samples
        if remaining <= 0:
            break
    return tasks


def compute(shards: list[tuple[Path, Path, int]], workers: Workers, images: int, chunk: int) -> PixelMoments:
    """Moments over the first ``images`` samples (0: all) of ``(tar, index, samples)`` shards, in order.

    The training split is shuffled globally before it is written, so its first N samples
    are a uniform random sample of it: big datasets need not be decoded twice in full.
    """
    total: PixelMoments | None = None
    for part in workers.imap(chunk_moments, chunks(shards, images, chunk)):
        if total is None:
            total = part
        else:
            total.merge(part)
    if total is None:
        raise ValueError("no training shards to compute statistics from")
    return total


def write(out: Path, moments: PixelMoments, split_images: int) -> dict:
    """Write ``stats.json`` and ``mean_image.npy`` under ``out``; returns the JSON record."""
    stats = moments.finish()
    buf = io.BytesIO()
    np.save(buf, stats["mean_image"].astype(np.float32))
    atomic_write_bytes(out / "mean_image.npy", buf.getvalue())
    record = {
        "units": "pixel values 0..255, RGB; the mean image is HxWxC",
        "computed_over": f"every pixel of the first {moments.images} of {split_images} training images, decoded "
        "from the written shards (the split is shuffled globally, so they are a uniform random sample)",
        "images": moments.images,
        "size": moments.size,
        "mean_image": "mean_image.npy",
        "mean": stats["mean"].tolist(),
        "std": stats["std"].tolist(),
        "covariance": stats["covariance"].tolist(),
        "eigval": stats["eigval"].tolist(),
        "eigvec": stats["eigvec"].tolist(),
        "eigvec_layout": "columns are eigenvectors, ordered by descending eigenvalue",
    }
    atomic_write_bytes(out / "stats.json", (json.dumps(record, indent=2) + "\n").encode())
    return record
