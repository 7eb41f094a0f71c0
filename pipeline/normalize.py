"""The float half of the pipeline, on the TARGET device: uint8 NHWC crops + per-sample draws ->
normalised (N, 3, crop, crop) tensors.

Why here and not in DALI: the data-dependent work (read, decode only the crop window) is done
per sample in uint8 by DALI; what follows (the horizontal flip, uint8 -> float, HWC -> CHW, the
per-pixel mean image cropped at the sample's anchor and flipped like it, PCA lighting ``L @
alpha``, or the per-channel mean/std mode) is index arithmetic and a handful of elementwise
passes over the whole batch.  (``fn.flip`` alone cost DALI ~15% of its CPU time per image; here
the flip is a reversed read that costs nothing measurable.)  On a GPU that is microseconds per
batch and ships 4x fewer bytes over PCIe (uint8, not float32); on DALI's CPU operators it cost as
much as the JPEG decode.  On the CPU-only path it
runs here on the CPU, per sample, so each image's working set stays in cache.

Both loaders (``pipeline.loader`` and ``pipeline.reference``) hand a ``RawBatch`` to the same
``DeviceNormalizer``, so the normalisation is tested once, against numpy.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from pipeline.buffers import OutputPool
from pipeline.config import LoaderConfig
from pipeline.stats import DatasetStats
from pipeline.views import view_anchors


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch CPU ops on this thread only, then restore the thread count.

    The per-sample ops are small (~150k elements) and DALI's threads keep every core busy: with
    torch's intra-op threads on top, each op's OpenMP barrier waits for a preempted thread and
    a batch took seconds instead of milliseconds (measured on the 2-core machine under load);
    and after any 2-thread region the idle OpenMP thread spins, taking CPU from DALI.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` on ``device`` (as ``dtype``) without making the host wait for the GPU.

    A copy from ordinary (pageable) host memory to a GPU makes the host wait for the work queued
    before it; from pinned memory it is queued like a kernel.  So host tensors are pinned first
    (a host memcpy into PyTorch's caching pinned allocator, which keeps the block until the copy
    has run).  A tensor already on ``device`` is only cast.
    """
    if tensor.device.type == "cpu" and device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device=device, dtype=dtype, non_blocking=True)


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RawBatch:
    """What the decode stage hands over: uint8 pixels and the draws that produced them.

    ``images`` is (N, h, w, 3) for training / 1 eval view, (N, V, h, w, 3) for V eval views.
    The crops are NOT flipped yet: ``mirror`` (N,) 0/1 says which ones the normaliser flips
    left-right.  ``anchors`` (N, 2) int64 = (x, y) pixel anchors of the crop in the full image,
    ``alpha`` (N, 3) float32 lighting draws (already times sigma); all three are None for
    evaluation (fixed views, their flips and no lighting come from ``pipeline.views``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor | None = None
    anchors: torch.Tensor | None = None
    mirror: torch.Tensor | None = None
    alpha: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class DeviceNormalizer(torch.nn.Module):
    """uint8 crops + draws -> ``flip(x - mean_image[crop]) + L @ alpha`` (or the channel mode)
    as ``dtype`` (N, 3, h, w), on the device its buffers live on (``.to(device)``).

    ``cfg.memory_format`` "channels_last" writes the batch as NHWC memory (a (N, 3, h, w) tensor
    with channels-last strides), which is what a channels_last model reads: with
    ``dtype=bfloat16`` too, the training step then neither converts the layout (a copy of the
    whole float32 batch) nor casts the input; the values are the same either way.
    """

    def __init__(self, stats: DatasetStats, cfg: LoaderConfig) -> None:
        super().__init__()
        self.mode, self.crop = cfg.normalize, cfg.crop
        self.dtype = TORCH_DTYPES[cfg.dtype]
        self.channels_last = cfg.memory_format == "channels_last"
        chw = torch.from_numpy(np.ascontiguousarray(stats.mean_image.transpose(2, 0, 1), np.float32))
        # Both orientations, so a flipped crop is a plain slice (flip = index reversal, done once).
        self.register_buffer("mean2", torch.stack([chw, chw.flip(-1)]).contiguous())
        self.register_buffer("lighting", torch.from_numpy(stats.lighting_matrix.astype(np.float32)))
        self.register_buffer("channel_mean", torch.from_numpy(stats.mean.astype(np.float32)))
        self.register_buffer("channel_std", torch.from_numpy(stats.std.astype(np.float32)))
        self._pool = OutputPool()  # CPU outputs only (see pipeline.buffers for why)
        self._view_draws: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the full images (the mean image's size)."""
        return int(self.mean2.shape[2]), int(self.mean2.shape[3])

    def forward(self, images: torch.Tensor, anchors: torch.Tensor, mirror: torch.Tensor,
                alpha: torch.Tensor | None = None) -> torch.Tensor:
        """(N, h, w, 3) uint8 crops taken at ``anchors`` (x, y), to be flipped where ``mirror``;
        returns (N, 3, h, w) ``self.dtype``.  ``alpha`` None = no lighting."""
        device = self.mean2.device
        # On the CPU everything here runs on this thread, the small matmul included: one
        # OpenMP region with 2 threads leaves a thread spinning against DALI's (~500 against
        # ~370 us of CPU per image in the loader, 2 cores: docs/benchmarks.md "Pipeline").
        with _single_threaded() if device.type == "cpu" else nullcontext():
            images = to_device(images, device)
            n = images.shape[0]
            offset = torch.zeros(n, 3, device=device) if alpha is None else \
                self.offset(to_device(alpha, device, torch.float32).reshape(n, 3))
            anchors = to_device(anchors, device, torch.int64).reshape(n, 2)
            mirror = to_device(mirror, device, torch.int64).reshape(n)
            if device.type == "cpu":
                return self._per_sample(images, anchors, mirror, offset)
            return self._batched(images, anchors, mirror, offset).to(self.dtype)

    def views(self, images: torch.Tensor, views: int) -> torch.Tensor:
        """Eval crops (N, h, w, 3) for 1 view or (N, V, h, w, 3) -> (N, 3, h, w) or (N, V, 3, h, w)."""
        if views == 1:
            return self(images, *self.view_draws(1, images.shape[0]))
        n, v = images.shape[:2]
        flat = self(images.reshape(n * v, *images.shape[2:]), *self.view_draws(views, n))
        return flat.reshape(n, v, *flat.shape[1:])

    def view_draws(self, views: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed (anchors, mirror) of ``views`` eval views, repeated for ``n`` images, on the
        normaliser's device; made once per (views, n), so no batch copies them to a GPU."""
        key = (views, n, self.mean2.device)
        if key not in self._view_draws:
            geometry = view_anchors(views, *self.image_size, self.crop)
            anchors = torch.tensor([[x, y] for x, y, _ in geometry]).repeat(n, 1)
            mirror = torch.tensor([m for _, _, m in geometry]).repeat(n)
            self._view_draws[key] = (anchors.to(self.mean2.device), mirror.to(self.mean2.device))
        return self._view_draws[key]

    def offset(self, alpha: torch.Tensor) -> torch.Tensor:
        """Lighting offsets ``L @ alpha`` (N, 3), as separate multiplies and adds in a fixed order
        rather than a matmul: the CPU and the GPU then round identically (a GEMM's summation
        order and fused multiply-adds differ between BLAS libraries), so both paths are
        bit-identical in the paper's mean-image mode."""
        lighting = self.lighting
        out = alpha[:, 0:1] * lighting[:, 0]
        out = out + alpha[:, 1:2] * lighting[:, 1]
        return out + alpha[:, 2:3] * lighting[:, 2]

    def _channel_affine(self, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Channel mode as one fused pass: (x + offset - mean) / std = x * scale + bias."""
        scale = (1.0 / self.channel_std)[:, None, None]
        bias = ((offset - self.channel_mean) / self.channel_std)[:, :, None, None]
        return scale, bias

    def _mean_crop(self, x: int, y: int, m: int, h: int, w: int) -> torch.Tensor:
        """View of the mean image under the crop at (x, y), flipped if ``m`` (no copy)."""
        x = self.image_size[1] - x - w if m else x  # the flipped crop's columns in the flipped mean
        return self.mean2[m, :, y:y + h, x:x + w]

    def _per_sample(self, images: torch.Tensor, anchors: torch.Tensor, mirror: torch.Tensor,
                    offset: torch.Tensor) -> torch.Tensor:
        """CPU: one image at a time, so its ~1 MB working set stays in cache; mean crops are
        views.  Same arithmetic, in the same order, as ``_batched`` (bit-identical results)."""
        n, h, w = images.shape[:3]
        # a released earlier batch if any; channels_last: NHWC memory seen as (N, 3, h, w)
        out = self._pool.empty((n, h, w, 3), self.dtype).permute(0, 3, 1, 2) if self.channels_last \
            else self._pool.empty((n, 3, h, w), self.dtype)
        scratch = None if self.dtype == torch.float32 else torch.empty(3, h, w)
        scale, bias = self._channel_affine(offset)
        for i, ((x, y), m) in enumerate(zip(anchors.tolist(), mirror.tolist())):
            dst, src = (out[i] if scratch is None else scratch), images[i].permute(2, 0, 1)
            src = src.flip(-1) if m else src  # a 150 kB uint8 copy; the float pass then reads it in order
            if self.mode == "channel":
                torch.addcmul(bias[i], src, scale, out=dst)
            else:
                torch.sub(src, self._mean_crop(x, y, m, h, w), out=dst)
                dst += offset[i][:, None, None]
            if scratch is not None:
                out[i].copy_(scratch)  # round once, from float32
        return out

    def _batched(self, images: torch.Tensor, anchors: torch.Tensor, mirror: torch.Tensor,
                 offset: torch.Tensor) -> torch.Tensor:
        """GPU: one gather of every sample's mean crop (broadcast index tensors, nothing
        materialised) and two elementwise kernels; no per-sample launches.  float32 result,
        computed in NHWC memory when ``channels_last`` (the same values, element by element)."""
        n, h, w = images.shape[:3]
        src = images if self.channels_last else images.permute(0, 3, 1, 2)
        flip = mirror.bool()[:, None, None, None]
        src = torch.where(flip, src.flip(2 if self.channels_last else 3), src)  # uint8, cheap on a GPU
        if self.mode == "channel":
            scale, bias = self._channel_affine(offset)
            if self.channels_last:
                scale, bias = scale.reshape(3), bias.permute(0, 2, 3, 1)
            return self._as_nchw(torch.addcmul(bias, src, scale[None]))
        x0 = torch.where(mirror.bool(), self.image_size[1] - anchors[:, 0] - w, anchors[:, 0])
        rows = anchors[:, 1, None] + torch.arange(h, device=images.device)
        cols = x0[:, None] + torch.arange(w, device=images.device)
        chan = torch.arange(3, device=images.device)
        if self.channels_last:  # broadcast index shapes: the channel axis last in memory, or second
            index = (chan[None, None, None, :], rows[:, :, None, None], cols[:, None, :, None])
        else:
            index = (chan[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :])
        out = self.mean2[(mirror[:, None, None, None], *index)]  # (N, 3, h, w) or (N, h, w, 3) float32
        torch.sub(src, out, out=out)
        out += offset[:, None, None, :] if self.channels_last else offset[:, :, None, None]
        return self._as_nchw(out)

    def _as_nchw(self, out: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) whatever the memory order the batch was computed in."""
        return out.permute(0, 3, 1, 2) if self.channels_last else out
