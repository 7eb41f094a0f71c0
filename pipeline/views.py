"""Crop geometry shared by the DALI graphs, the reference loader and the tests (numpy only)."""
from __future__ import annotations

import numpy as np


def eval_views(views: int) -> list[tuple[float, float, int]]:
    """(crop_pos_x, crop_pos_y, mirror) of each view: centre, or 4 corners + centre then their flips."""
    if views == 1:
        return [(0.5, 0.5, 0)]
    if views == 10:
        five = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)]
        return [(x, y, m) for m in (0, 1) for x, y in five]
    raise ValueError(f"views must be 1 or 10, got {views}")


def anchor(pos: float, size: int, crop: int) -> int:
    """Pixel anchor of a crop at relative position ``pos`` in [0, 1] (DALI's crop_pos convention)."""
    return int(round(pos * (size - crop)))


def crop_hwc(image: np.ndarray, x0: int, y0: int, crop: int, mirror: bool) -> np.ndarray:
    """``image[y0:y0+crop, x0:x0+crop]``, flipped left-right if ``mirror`` (HWC)."""
    out = image[y0:y0 + crop, x0:x0 + crop]
    return out[:, ::-1] if mirror else out


def view_stack(image: np.ndarray, crop: int, views: int, flip: bool = True) -> np.ndarray:
    """The eval views of one HWC image as numpy slices, stacked: (views, crop, crop, C);
    ``flip=False``: the windows only, as the loaders hand them to the normaliser."""
    h, w = image.shape[:2]
    return np.stack([crop_hwc(image, anchor(x, w, crop), anchor(y, h, crop), crop, flip and bool(m))
                     for x, y, m in eval_views(views)])
