"""Labels and sample ids from the raw bytes the DALI graph hands over (numpy, per batch).

The graph returns the ``.cls`` component and the JPEG's source info as zero-padded uint8 rows;
parsing them here is a few vectorised numpy passes per batch, where DALI (no string-to-int
operator) needed ~10 arithmetic operators per sample.  The shard format is unchanged.
"""
from __future__ import annotations

import numpy as np
import torch


def ascii_ints(raw: np.ndarray) -> np.ndarray:
    """int64 values of zero-padded ASCII digit strings, one per row of ``raw`` (N, width) uint8.

    Bytes that are not digits (padding, a trailing newline) are skipped.  (``ascii_ints_torch``
    on a numpy array, for callers that hold numpy.)
    """
    return ascii_ints_torch(torch.from_numpy(np.ascontiguousarray(raw, np.uint8))).numpy()


def ascii_ints_torch(raw: torch.Tensor) -> torch.Tensor:
    """int64 values of the zero-padded ASCII digit rows of a uint8 tensor (N, width), on its
    device: a few elementwise passes (kernels on a GPU tensor: no copy to the host and no
    synchronisation).  The loader's label bytes are host bytes on every graph (``pipeline.graph``).
    Non-digit bytes are skipped."""
    value = torch.zeros(raw.shape[0], dtype=torch.int64, device=raw.device)
    if raw.numel() == 0:  # a rank's empty last batch
        return value
    for column in raw.reshape(raw.shape[0], -1).to(torch.int64).unbind(1):
        value = torch.where((column >= 48) & (column <= 57), value * 10 + column - 48, value)
    return value


def key_numbers(raw_info: np.ndarray) -> np.ndarray:
    """Sample numbers from zero-padded source infos ``...:<split>-NNNNNNNN.jpg`` (N, width) uint8."""
    rows = np.asarray(raw_info, np.uint8)
    if len(rows) == 0:
        return np.zeros(0, np.int64)
    rows = rows.reshape(len(rows), -1)
    names = (bytes(row).rstrip(b"\0").rsplit(b":", 1)[-1] for row in rows)
    return np.array([int(name.split(b".", 1)[0].rsplit(b"-", 1)[1]) for name in names], np.int64)
