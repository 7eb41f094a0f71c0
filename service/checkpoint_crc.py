"""A checkpoint payload's CRC-32 and size, over its structure and every tensor's bytes: how a
damaged file is told from a good one (``service.checkpoint.load``) and how much room a write
needs (``service.checkpoint_writer``)."""
from __future__ import annotations

import zlib
from typing import Any

import torch


def _skeleton_and_tensors(value: Any, tensors: list[torch.Tensor]) -> Any:
    """The payload with each tensor replaced by its dtype and shape (tensors collected in order)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return f"tensor({value.dtype}, {tuple(value.shape)})"
    if isinstance(value, dict):
        return {k: _skeleton_and_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_skeleton_and_tensors(v, tensors) for v in value]
    return value


def checksum(payload: dict[str, Any]) -> int:
    """CRC-32 of everything in ``payload`` except its ``crc32`` key: structure, values, tensor bytes.

    ``torch.load`` happily returns tensors whose bytes were damaged on disk; this is how a corrupt
    checkpoint is told from a good one.  Its cost rides in the writer thread's time per checkpoint
    (docs/benchmarks.md "Service": 1.5 s in all for 488 MB on 2 cores, ``bench/cpu/service.json``).
    """
    tensors: list[torch.Tensor] = []
    skeleton = _skeleton_and_tensors({k: v for k, v in payload.items() if k != "crc32"}, tensors)
    crc = zlib.crc32(repr(skeleton).encode())
    for t in tensors:
        crc = zlib.crc32(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy(), crc)
    return crc


def tensor_bytes(payload: dict[str, Any]) -> int:
    """Bytes of every tensor in ``payload``: about the size of its file."""
    tensors: list[torch.Tensor] = []
    _skeleton_and_tensors(payload, tensors)
    return sum(t.nelement() * t.element_size() for t in tensors)
