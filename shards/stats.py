"""Dataset statistics for the augmentation: mean image, channel moments and the RGB PCA.

Computed from the training shards themselves (the exact pixels the pipeline will decode),
after they are written.  Units are raw 0..255 pixel values throughout.  Everything is a sum
over pixels, so per-shard partial sums (computed in parallel) add up exactly, in shard order,
to the same numbers every run.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from shards.tarwriter import atomic_write_bytes


@dataclass
class PixelMoments:
    """Running sums over images of one size: sum image, sum of x and of x x^T over pixels."""

    size: int = 256
    images: int = 0
    sum_image: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_outer: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))

    def __post_init__(self) -> None:
        if self.sum_image is None:
            self.sum_image = np.zeros((self.size, self.size, 3))

    def add(self, rgb: np.ndarray) -> None:
        """Add one HxWx3 uint8 image."""
        if rgb.shape != (self.size, self.size, 3):
            raise ValueError(f"expected a {self.size}x{self.size}x3 image, got {rgb.shape}")
        x = rgb.reshape(-1, 3).astype(np.float64)
        self.sum_image += rgb
        self.sum_outer += x.T @ x
        self.images += 1

    def merge(self, other: PixelMoments) -> None:
        """Add another partial sum (shard order keeps the floating-point result reproducible)."""
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


def shard_moments(task: tuple[Path, int]) -> PixelMoments:
    """Decode the first ``limit`` ``.jpg`` images of one shard and sum their pixel moments."""
    tar_path, limit = task
    moments: PixelMoments | None = None
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if moments is not None and moments.images >= limit:
                break
            if member.name.endswith(".jpg"):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                moments = moments or PixelMoments(rgb.shape[0])
                moments.add(rgb)
    return moments or PixelMoments()


def compute(shards: list[tuple[Path, int]], pool: Pool, images: int) -> PixelMoments:
    """Moments over the first ``images`` samples (0: all) of ``(tar, samples)`` shards, in order.

    The training split is shuffled globally before it is written, so its first N samples
    are a uniform random sample of it: big datasets need not be decoded twice in full.
    """
    tasks, remaining = [], images or sum(n for _, n in shards)
    for path, samples in shards:
        if remaining <= 0:
            break
        tasks.append((path, min(samples, remaining)))
        remaining -= samples
    total: PixelMoments | None = None
    for part in pool.imap(shard_moments, tasks):
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
