"""Local response normalisation (the paper's section 3.3), per tower, in two equal forms."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LrnImpl = Literal["torch", "window_sum"]
# Project constants (SPEC 1): code-faithful LRN (PyTorch divides alpha by size, as Krizhevsky's code did).
LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def local_response_norm(x: Tensor, towers: int = 1, fp32: bool = True, impl: LrnImpl = "torch") -> Tensor:
    """LRN with the project constants, applied to each tower's channels separately.

    With ``towers=2`` the first and second halves of the channels are normalised on their own,
    so the 5-channel window never reaches across the tower boundary (as on the paper's GPUs).
    ``fp32``: a float16/bfloat16 input is normalised in float32 and cast back.  LRN squares its
    input: in float16 any activation above 256 squares to inf and its output becomes 0 (conv1's
    ReLU outputs reach that easily on 0..255 pixels); bfloat16 keeps the range but the sum of
    squares loses digits.  (PyTorch's CPU kernels also have no float16/bfloat16 LRN at all.)
    With ``fp32=False`` under CUDA autocast the input's precision covers the squares and the
    window sum only: ``pow`` is on autocast's float32 list, so the denominator and the division
    run in float32 and the result is cast back; a "LRN in bf16" measurement is of that mix.
    ``impl``: "torch" is ``F.local_response_norm``; "window_sum" the same formula written as
    elementwise ops (:func:`_lrn_window_sum`), equal to it up to float rounding.
    """
    dtype = x.dtype
    if fp32 and dtype in LOW_PRECISION:
        x = x.float()
    if impl == "window_sum":
        out = _lrn_window_sum(x, towers)
    elif towers == 1:
        out = F.local_response_norm(x, **LRN)
    else:
        out = torch.cat([F.local_response_norm(h, **LRN) for h in x.chunk(towers, dim=1)], dim=1)
    return out.to(dtype)


def _lrn_window_sum(x: Tensor, towers: int) -> Tensor:
    """``x / (k + alpha * mean of x^2 over the 5-channel window)^beta``, every tower at once, the
    window sum as five shifted slices of the zero-padded squares.

    Why: ``F.local_response_norm`` squares, pads a 5-D view and runs ``avg_pool3d`` over it (and
    the towers layout adds a chunk and a cat), a chain of passes over conv1's and conv2's large
    maps forward and backward; these slices are plain elementwise arithmetic that
    ``torch.compile`` can fuse with the ReLU before them.  Same formula and divisor (the padded
    window average), so it equals the PyTorch LRN up to the summation order's rounding.
    """
    n, c, h, w = x.shape
    size, per_tower = LRN["size"], c // towers
    squares = (x * x).view(n, towers, per_tower, h, w)
    padded = F.pad(squares, (0, 0, 0, 0, size // 2, (size - 1) // 2))
    total = padded[:, :, :per_tower]
    for i in range(1, size):
        total = total + padded[:, :, i:i + per_tower]
    div = (total / size).reshape(n, c, h, w).mul(LRN["alpha"]).add(LRN["k"]).pow(LRN["beta"])
    return x / div
