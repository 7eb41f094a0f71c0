"""The dataset statistics a run trains with, as a part of its identity: a resume on shards whose
statistics changed is refused, as one on other shards is.

Why: the data fingerprint (``service.state.data_fingerprint``) covers the classes and every tar's
checksum, not ``stats.json`` and ``mean_image.npy``, which ``make shards`` computes from the tars
afterwards.  Shards made again with other statistics settings (``--stats_images 1``: the same
tars, the mean image of one image) were resumed without a word, and the run trained on with
another input normalisation and lighting than its checkpoint's weights had learnt.

Compared with a tolerance, not by bytes: the same tars' statistics computed on another machine
may differ in their last bits (float sums in another order), and an eigenvector may come out with
its sign flipped, which changes nothing the lighting draws (``alpha`` is symmetric): so the
lighting is compared by its offsets' covariance ``L @ L.T``, the mean image by the means of a 4x4
grid of its blocks.  A checkpoint written before this check has no summary: it resumes as before.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stats import DatasetStats

GRID = 4  # the mean image is summarised as GRID x GRID block means per channel
PIXELS = 0.5  # tolerance in 0..255 pixel units (mean, std, mean-image blocks)
LIGHTING = 0.01  # relative tolerance of the lighting covariance


def summary(stats: DatasetStats) -> dict[str, Any]:
    """What a checkpoint keeps of ``stats`` (plain lists: the identity is compared as data)."""
    rows = np.array_split(stats.mean_image.astype(np.float64), GRID, axis=0)
    blocks = [[block.mean(axis=(0, 1)) for block in np.array_split(row, GRID, axis=1)] for row in rows]
    lighting = stats.lighting_matrix.astype(np.float64)
    return {"mean": stats.mean.tolist(), "std": stats.std.tolist(), "mean_image": np.asarray(blocks).tolist(),
            "lighting": (lighting @ lighting.T).tolist()}


def difference(saved: dict[str, Any] | None, mine: dict[str, Any] | None) -> str | None:
    """What differs between two summaries, in words; None when they agree (or one is missing:
    a checkpoint from before this check, or a caller with no statistics)."""
    if saved is None or mine is None:
        return None
    for key in ("mean", "std", "mean_image"):
        a, b = np.asarray(saved[key]), np.asarray(mine[key])
        if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=PIXELS):
            return f"the {key.replace('_', ' ')} differs by up to {_gap(a, b)} (0..255 pixel values)"
    a, b = np.asarray(saved["lighting"]), np.asarray(mine["lighting"])
    if not np.allclose(a, b, rtol=0, atol=LIGHTING * max(np.abs(a).max(), np.abs(b).max(), 1e-12)):
        return "the PCA lighting (eigenvalues and eigenvectors) differs"
    return None


def _gap(a: np.ndarray, b: np.ndarray) -> str:
    return f"{np.abs(a - b).max():.3g}" if a.shape == b.shape else "a different shape"


def describe(shards: Path | str | None, what: str) -> str:
    """The part of a refusal naming the statistics that differ."""
    where = f" (stats.json and mean_image.npy of {shards})" if shards else ""
    return (f"the shards' dataset statistics{where} are not the ones it trained with: {what}; the shards were "
            "made again with other statistics settings")
