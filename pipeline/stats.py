"""Dataset statistics the augmentation needs: mean image, channel moments and the RGB PCA.

PCA lighting (paper section 4.1; SPEC section 3/4).  The published recipe works on pixels in
0..1: offset_i = sum_j eigvec[i][j] * alpha_j * eigval01_j with eigval01 the variance (no square
root), then x255 for 0..255 pixels.  ``stats.json`` stores eigval as variances of 0..255 pixels,
so eigval01 = eigval / 255**2 and the offset in 0..255 units is

    offset = 255 * eigvec @ (alpha * eigval / 255**2) = eigvec @ (alpha * eigval / 255)

i.e. ``offset = L @ alpha`` with ``L = eigvec * (eigval / 255)`` (column j scaled).  With
alpha ~ N(0, sigma^2 I) the offsets have covariance ``sigma^2 * L @ L.T``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class DatasetStats:
    """The parts of ``stats.json`` (+ ``mean_image.npy``) used by the loaders, 0..255 units."""

    mean: np.ndarray  # (3,)
    std: np.ndarray  # (3,)
    eigval: np.ndarray  # (3,) variances, descending
    eigvec: np.ndarray  # (3, 3), columns are eigenvectors
    mean_image: np.ndarray  # (H, W, 3) float32, HWC

    @property
    def lighting_matrix(self) -> np.ndarray:
        """``L`` with ``offset = L @ alpha`` in 0..255 units (see the module docstring)."""
        return (self.eigvec * (self.eigval / 255.0)[None, :]).astype(np.float32)


def load_stats(stats_path: Path | str) -> DatasetStats:
    """Read ``stats.json`` and the mean image it names; raise ValueError if anything is off."""
    stats_path = Path(stats_path)
    record = json.loads(stats_path.read_text())
    mean_image = np.load(stats_path.parent / record["mean_image"]).astype(np.float32)
    stats = DatasetStats(
        mean=np.asarray(record["mean"], np.float32),
        std=np.asarray(record["std"], np.float32),
        eigval=np.asarray(record["eigval"], np.float64),
        eigvec=np.asarray(record["eigvec"], np.float64),
        mean_image=mean_image,
    )
    if stats.mean.shape != (3,) or stats.std.shape != (3,) or stats.eigval.shape != (3,) \
            or stats.eigvec.shape != (3, 3) or mean_image.ndim != 3 or mean_image.shape[2] != 3:
        raise ValueError(f"{stats_path}: unexpected shapes in the dataset statistics")
    if np.any(stats.eigval < 0) or np.any(stats.std <= 0):
        raise ValueError(f"{stats_path}: negative eigenvalues or non-positive std")
    return stats


def lighting_offset(stats: DatasetStats, alpha: np.ndarray) -> np.ndarray:
    """Per-channel offset (0..255 units) for draws ``alpha`` of shape (..., 3)."""
    return np.asarray(alpha, np.float64) @ stats.lighting_matrix.T.astype(np.float64)


def lighting_covariance(stats: DatasetStats, sigma: float) -> np.ndarray:
    """Theoretical 3x3 covariance of the lighting offset for alpha_j ~ N(0, sigma)."""
    lm = stats.lighting_matrix.astype(np.float64)
    return sigma**2 * lm @ lm.T
