"""Crop geometry shared by the DALI graphs, the normaliser, the reference loader and the tests.

Every evaluation view is computed HERE, once, as integer pixel anchors (``view_anchors``); the
DALI graph slices the decoded image at exactly those integers and the normaliser cuts the mean
image at the same integers, so the two can never disagree.  (DALI's ``fn.crop`` turns a relative
``crop_pos`` into pixels by rounding halves up while Python's ``round`` rounds them to even: with
``crop=227`` the centre anchor is 14.5 -> DALI 15, Python 14, and the mean image was subtracted
one pixel off the image it belonged to.)
"""
from __future__ import annotations

import math

import numpy as np

VIEW_COUNTS = (1, 10)  # the view sets eval_views defines: the centre crop, or the paper's ten


def eval_views(views: int) -> list[tuple[float, float, int]]:
    """(relative x, relative y, mirror) of each view: centre, or 4 corners + centre then their flips."""
    if views == 1:
        return [(0.5, 0.5, 0)]
    if views == 10:
        five = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)]
        return [(x, y, m) for m in (0, 1) for x, y in five]
    raise ValueError(f"views must be {' or '.join(map(str, VIEW_COUNTS))}, got {views}")


def anchor(pos: float, size: int, crop: int) -> int:
    """Pixel anchor of a crop at relative position ``pos`` in [0, 1]; halves round up (DALI's
    convention for ``crop_pos``, kept so the anchors stay where earlier versions put them)."""
    if crop > size:
        raise ValueError(f"a {crop}-pixel crop does not fit in {size} pixels")
    return int(math.floor(pos * (size - crop) + 0.5))


def view_anchors(views: int, height: int, width: int, crop: int) -> list[tuple[int, int, int]]:
    """Integer (x, y, mirror) of every eval view of a ``height`` x ``width`` image: the one
    definition the DALI graph, the normaliser and the reference loader all use."""
    return [(anchor(x, width, crop), anchor(y, height, crop), m) for x, y, m in eval_views(views)]


def crop_hwc(image: np.ndarray, x0: int, y0: int, crop: int, mirror: bool) -> np.ndarray:
    """``image[y0:y0+crop, x0:x0+crop]``, flipped left-right if ``mirror`` (HWC)."""
    out = image[y0:y0 + crop, x0:x0 + crop]
    return out[:, ::-1] if mirror else out


def view_stack(image: np.ndarray, crop: int, views: int, flip: bool = True) -> np.ndarray:
    """The eval views of one HWC image as numpy slices, stacked: (views, crop, crop, C);
    ``flip=False``: the windows only, as the loaders hand them to the normaliser."""
    h, w = image.shape[:2]
    return np.stack([crop_hwc(image, x, y, crop, flip and bool(m)) for x, y, m in view_anchors(views, h, w, crop)])
