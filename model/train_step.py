"""What the training service calls: one training step, and evaluation with the 10-view average.

Neither function synchronises with the GPU per batch: ``train_step`` returns the loss as a
device tensor, and ``evaluate`` keeps its counts on the device until the end.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def prepare_model(model: nn.Module, *, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """Convert ``model`` in place for speed on GPUs; its state dict keys do not change.

    ``channels_last`` stores conv weights NHWC (pass ``channels_last=True`` to the step functions
    too, so images match). ``compile`` uses ``nn.Module.compile`` (in place, unlike
    ``torch.compile(model)``, which would prefix every state dict key with ``_orig_mod.``).
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)  # keeps each tower on its own device
    if compile:
        model.compile()
    return model


def _input_device(model: nn.Module) -> torch.device:
    device = getattr(model, "input_device", None)
    return device if device is not None else next(model.parameters()).device


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    # One context covers both towers: autocast is per device *type*, not per device.
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _prepare_images(images: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    *,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    scaler: torch.amp.GradScaler | None = None,
) -> Tensor:
    """One SGD step on a batch: (N, 3, 224, 224) images, (N,) int64 labels.

    Puts the model in training mode (dropout on). Returns the mean cross-entropy loss as a
    detached tensor on the logits' device: read it with ``.item()`` only when you log it.
    ``scaler``: required for ``autocast_dtype=torch.float16`` (float16's 5 exponent bits flush
    the small gradients of a 60M-parameter model to zero; the scaler multiplies the loss before
    backward and skips steps whose gradients overflowed).  It costs one host-device sync per step
    (the overflow check), which is why bfloat16, with float32's range and no scaler, is the fast path.
    """
    if autocast_dtype == torch.float16 and scaler is None:
        raise ValueError("float16 autocast needs a GradScaler (scaler=torch.amp.GradScaler()); "
                         "or use bfloat16, which needs none")
    model.train()
    device = _input_device(model)
    images = _prepare_images(images, device, channels_last)
    with _autocast(device, autocast_dtype):
        logits = model(images)
    # The loss in fp32 whatever the autocast dtype: log-softmax over 1000 classes wants it.
    if labels.numel():
        loss = F.cross_entropy(logits.float(), labels.to(logits.device, non_blocking=True))
    else:  # a rank's empty last batch (pipeline.loader): zero gradients, but the step (and DDP's
        loss = logits.float().sum() * 0.0  # gradient all-reduce, which every rank must join) still runs
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # unscales first; skipped when a gradient is inf/nan
        scaler.update()
    return loss.detach()


@dataclass(frozen=True)
class EvalResult:
    """Errors are fractions in 0..1; ``loss`` is the cross-entropy of the view-averaged softmax.
    ``images == 0`` (a rank whose share of the split was empty) has NaN metrics and no weight."""

    top1_error: float
    top5_error: float
    loss: float
    images: int

    @classmethod
    def combine(cls, results: Iterable[EvalResult]) -> EvalResult:
        """One result from several disjoint parts of a split (e.g. every rank's), each weighted
        by its images; parts without images count for nothing (their NaN never leaks in)."""
        parts = [r for r in results if r.images > 0]
        n = sum(r.images for r in parts)
        if n == 0:
            return cls(math.nan, math.nan, math.nan, 0)
        mean = [sum(getattr(r, k) * r.images for r in parts) / n for k in ("top1_error", "top5_error", "loss")]
        return cls(*mean, n)


def view_averaged_probs(model: nn.Module, images: Tensor, channels_last: bool = False) -> Tensor:
    """Softmax outputs averaged over views: (N, V, 3, H, W) or (N, 3, H, W) -> (N, classes).

    Averaging probabilities, not logits, is the paper's rule (SPEC 4).
    """
    n, views = images.shape[0], images.shape[1] if images.dim() == 5 else 1
    flat = images.flatten(0, 1) if images.dim() == 5 else images
    if channels_last:
        flat = flat.contiguous(memory_format=torch.channels_last)
    return F.softmax(model(flat).float(), dim=1).view(n, views, -1).mean(dim=1)


def _error_counts(probs: Tensor, labels: Tensor) -> Tensor:
    """[top-1 misses, top-5 misses, summed cross-entropy] of one batch, on the device."""
    hits = probs.topk(min(5, probs.shape[1]), dim=1).indices == labels[:, None]
    nll = -probs.gather(1, labels[:, None]).clamp_min(1e-30).log().sum()
    return torch.stack([(~hits[:, 0]).sum().double(), (~hits.any(dim=1)).sum().double(), nll.double()])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> EvalResult:
    """Top-1 and top-5 error over ``batches`` of (images, labels), in eval mode (no dropout).

    ``images`` is (N, 3, 224, 224) for one view per image, or (N, V, 3, 224, 224) for V views
    per image (e.g. :func:`model.views.ten_views`); the V softmax outputs are averaged.
    A batch of 0 images is skipped: a rank's share of an uneven split ends with one
    (``pipeline.loader``), and its views cannot be reshaped (``view(0, V, -1)`` is ambiguous).
    Every metric is a mean over the real images; a rank that got none returns ``images == 0``
    (see :meth:`EvalResult.combine`).  The model's training mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = _input_device(model)
    totals, count, seen = None, 0, 0
    try:
        for images, labels in batches:
            seen += 1
            if labels.numel() == 0:
                continue
            with _autocast(device, autocast_dtype):
                probs = view_averaged_probs(model, images.to(device, non_blocking=True), channels_last)
            counts = _error_counts(probs, labels.to(probs.device, non_blocking=True))
            totals = counts if totals is None else totals + counts
            count += labels.numel()
    finally:
        model.train(was_training)
    if not seen:
        raise ValueError("evaluate got no batches")
    if totals is None:
        return EvalResult(math.nan, math.nan, math.nan, 0)
    top1, top5, loss = (totals / count).tolist()  # the only device sync
    return EvalResult(top1, top5, loss, count)
