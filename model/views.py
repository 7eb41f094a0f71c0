"""The paper's 10 test views (SPEC section 4): 4 corner + 1 centre crop, and their mirror images,
on tensors.

The geometry (where each view sits, in which order, how a centre anchor of half a pixel is
rounded) has one owner, ``pipeline.views.view_anchors``, which the DALI graph and the
normaliser use too: a tensor cut here is the same window the evaluation loader delivers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.views import view_anchors

NUM_VIEWS = 10


def ten_views(images: Tensor, size: int = 224) -> Tensor:
    """(N, C, H, W) -> (N, 10, C, size, size).

    View order: top-left, top-right, bottom-left, bottom-right, centre, then the same five
    flipped horizontally. This is the input convention of :func:`model.train_step.evaluate`.
    """
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"images of {h}x{w} are smaller than the {size}x{size} crop")
    crops = []
    for x, y, mirror in view_anchors(NUM_VIEWS, h, w, size):
        crop = images[..., y: y + size, x: x + size]
        crops.append(torch.flip(crop, dims=[-1]) if mirror else crop)
    return torch.stack(crops, dim=1)
