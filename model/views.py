"""The paper's 10 test views (SPEC section 4): 4 corner + 1 centre crop, and their mirror images."""
from __future__ import annotations

import torch
from torch import Tensor

NUM_VIEWS = 10


def ten_views(images: Tensor, size: int = 224) -> Tensor:
    """(N, C, H, W) -> (N, 10, C, size, size).

    View order: top-left, top-right, bottom-left, bottom-right, centre, then the same five
    flipped horizontally. This is the input convention of :func:`model.train_step.evaluate`.
    """
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"images of {h}x{w} are smaller than the {size}x{size} crop")
    top, left = (h - size) // 2, (w - size) // 2
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    crops = [images[..., y : y + size, x : x + size] for y, x in corners]
    crops += [torch.flip(c, dims=[-1]) for c in crops]
    return torch.stack(crops, dim=1)
