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

from shards.manifest import Manifest, ManifestError, rerun_hint


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
    """Read ``stats.json`` and the mean image it names.  Both are files of the shard directory's
    contract (``shards.manifest``), so anything off (unreadable, not JSON, a key missing, a
    truncated ``.npy``, wrong shapes, a NaN or infinity) is its ``ManifestError`` (a ValueError) naming the file and
    the fix, which the service and the tools print as one line."""
    stats_path = Path(stats_path)
    record = _record(stats_path)
    try:
        mean_path = stats_path.parent / record["mean_image"]
        stats = DatasetStats(
            mean=np.asarray(record["mean"], np.float32),
            std=np.asarray(record["std"], np.float32),
            eigval=np.asarray(record["eigval"], np.float64),
            eigvec=np.asarray(record["eigvec"], np.float64),
            mean_image=_mean_image(mean_path),
        )
    except KeyError as exc:
        raise _bad(stats_path, f"lacks the key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise _bad(stats_path, f"has a value of the wrong kind ({exc})") from None
    if stats.mean.shape != (3,) or stats.std.shape != (3,) or stats.eigval.shape != (3,) \
            or stats.eigvec.shape != (3, 3) or stats.mean_image.ndim != 3 or stats.mean_image.shape[2] != 3:
        raise _bad(stats_path, "has unexpected shapes in the dataset statistics")
    # A NaN (which Python's JSON reads) or an infinity passes every comparison below and made each
    # training step's loss NaN: the run ended as "diverged", blamed on optim.lr.
    for key in ("mean", "std", "eigval", "eigvec", "mean_image"):
        if not np.all(np.isfinite(getattr(stats, key))):
            raise _bad(mean_path if key == "mean_image" else stats_path,
                       f"holds a value that is not a finite number ({key})")
    if np.any(stats.eigval < 0) or np.any(stats.std <= 0):
        raise _bad(stats_path, "has negative eigenvalues or non-positive std")
    return stats


def manifest_stats(manifest: Manifest) -> DatasetStats:
    """The statistics of ``manifest``'s shards, their mean image the witness of the images' size:
    ``make shards`` makes it from the images, so a manifest edited to another ``parameters.size``
    is named here (the loaders failed in DALI's cropping window with no word of the key; predict
    made its images that size and subtracted the mean image's crops at the wrong places)."""
    stats = load_stats(manifest.stats_path)
    size, (h, w) = manifest.image_size, stats.mean_image.shape[:2]
    if (h, w) != (size, size):
        raise ManifestError(f"{manifest.root / 'manifest.json'}: parameters.size {size} is not the {w}x{h} of the "
                            f"images' mean image (of {manifest.stats_path}); the manifest was edited or belongs to "
                            f"other shards: {rerun_hint(manifest.root)}")
    return stats


def _bad(path: Path, what: str) -> ManifestError:
    return ManifestError(f"{path} {what}; {rerun_hint(path.parent)}")


def _record(path: Path) -> dict:
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # not UTF-8, not JSON
        raise _bad(path, f"is not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise _bad(path, "is JSON but not an object")
    return record


def _mean_image(path: Path) -> np.ndarray:
    try:
        return np.load(path).astype(np.float32)
    except (OSError, ValueError, EOFError) as exc:  # missing, truncated ("file seems not fully written?"), not .npy
        raise _bad(path, f"cannot be read as the mean image ({exc})") from None


def lighting_offset(stats: DatasetStats, alpha: np.ndarray) -> np.ndarray:
    """Per-channel offset (0..255 units) for draws ``alpha`` of shape (..., 3)."""
    return np.asarray(alpha, np.float64) @ stats.lighting_matrix.T.astype(np.float64)


def lighting_covariance(stats: DatasetStats, sigma: float) -> np.ndarray:
    """Theoretical 3x3 covariance of the lighting offset for alpha_j ~ N(0, sigma)."""
    lm = stats.lighting_matrix.astype(np.float64)
    return sigma**2 * lm @ lm.T
