"""The whole training step as one compiled function: forward, loss, backward and the paper's
update, under ``torch.compile``.

Why: compiling the model alone (``nn.Module.compile``) doubled the H200's rate (8.2k -> 15.5k
images/s at batch 128: docs/benchmarks.md "GPU numbers", ``bench/gpu/model.json``) but left the
optimizer eager (four passes over 244 MB of float32 weights, velocities and gradients per step) and
the backward and the update as separate launches; compiled together, inductor fuses the update into
the gradient computation's last kernels and ``mode="reduce-overhead"`` can replay the whole step as
CUDA graphs.  With torch >= 2.13 Dynamo traces ``loss.backward()`` into the same graph
(``trace_autograd_ops``); older versions break the graph there and compile the forward (with its
backward, by AOTAutograd) and the update apart.  ``trace_backward="auto"`` gates it on the version,
not on the flag: torch 2.11 (the GPU machines' PyTorch so far) already has the flag, and the traced
backward passes the compiled-equals-eager test there on the CPU (``tests/test_model_step.py`` runs
it with "on" on every version that has the flag), but the graph break is torch.compile's
long-standing path; "on" traces it wherever the flag exists (a lever of ``make gpu-check``'s sweep),
"off" always breaks.

What would recompile, and does not (``tests/test_model_step.py`` counts Dynamo's graphs):

* the learning rate: a Python float is a constant of the graph, so the plateau drop would
  recompile; here it is a 0-dim tensor per (group, device), refilled when the schedule (or a
  resume) changed ``param_groups[i]["lr"]``;
* the epoch's short last batch (and a rank's empty one): padded to the full batch, with weight 0
  for the padding.  The loss is ``sum(w * ce) / max(sum(w), 1)``, the mean over the real samples,
  and every layer of AlexNet works per sample (no batch norm), so the real samples' gradients
  are exactly those of the unpadded batch.  ``mark_dynamic`` was the alternative: one graph for
  symbolic batch sizes means slower kernels for every step, to save one padded step per epoch
  (and CUDA graphs record one graph per size anyway);
* evaluation: it runs the model, not this function, so it never touches this graph.

The recipe is unchanged: the same loss, the same ``PaperSGD`` rule (``model.optim.paper_update_``)
on the optimizer's own velocities, so checkpoints and ``PlateauSchedule`` work as before.
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.optim import PaperSGD, paper_update_

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
TraceBackward = Literal["auto", "on", "off"]
# Whether this torch can trace ``loss.backward()`` into a graph at all, and whether "auto" does.
CAN_TRACE_BACKWARD = hasattr(torch._dynamo.config, "trace_autograd_ops")
BACKWARD_IN_GRAPH = CAN_TRACE_BACKWARD and torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)


def traces_backward(setting: TraceBackward) -> bool:
    """Whether the compiled step traces its backward with ``setting`` on this torch."""
    if setting == "on" and not CAN_TRACE_BACKWARD:
        raise ValueError(f"torch {torch.__version__} cannot trace backward() into a graph "
                         "(no torch._dynamo.config.trace_autograd_ops): use auto or off")
    return setting == "on" or (setting == "auto" and BACKWARD_IN_GRAPH)


def uses_cudagraphs(mode: CompileMode) -> bool:
    """Whether ``torch.compile``'s ``mode`` records CUDA graphs: "reduce-overhead" and, on
    torch 2.11 and 2.13, "max-autotune" too (inductor's own table, not a list of names here)."""
    from torch._inductor import list_mode_options

    return bool(list_mode_options(mode).get("triton.cudagraphs"))


def _devices_of(params: list[Tensor]) -> list[torch.device]:
    return sorted({p.device for p in params}, key=str)


class CompiledStep:
    """``step(images, labels) -> loss`` like ``model.train_step`` (the loss a detached device tensor),
    for batches of at most ``batch_size`` samples.

    ``model`` is the AlexNet (its parameters are updated), ``trainable`` what the forward runs
    (the model, or its DDP wrapper: then the backward stays outside the graph, where DDP's
    gradient hooks run, whatever ``trace_backward`` says).  ``compile=False`` runs the same
    function eagerly (tests, debugging).
    """

    def __init__(self, model: nn.Module, optimizer: PaperSGD, batch_size: int, *,
                 trainable: nn.Module | None = None, autocast_dtype: torch.dtype | None = None,
                 channels_last: bool = False, mode: CompileMode = "default", compile: bool = True,
                 trace_backward: TraceBackward = "auto") -> None:
        self.model, self.trainable, self.optimizer = model, trainable or model, optimizer
        self.batch_size, self.autocast_dtype, self.channels_last = batch_size, autocast_dtype, channels_last
        self.cudagraphs = compile and uses_cudagraphs(mode)
        self._buckets, self._lrs, self._lr_values = [], {}, {}
        for g, group in enumerate(optimizer.param_groups):
            params = [p for p in group["params"] if p.requires_grad]
            velocities = optimizer.velocities(params)
            for device in _devices_of(params):
                on = [i for i, p in enumerate(params) if p.device == device]
                self._buckets.append(([params[i] for i in on], [velocities[i] for i in on], g, device,
                                      group["momentum"], group["weight_decay"]))
                self._lrs[g, device] = torch.zeros((), device=device)
        for tensor in [*self._lrs.values(), *(v for bucket in self._buckets for v in bucket[1])]:
            torch._dynamo.mark_static_address(tensor)  # fixed addresses: CUDA graphs read them in place
        self._ones: dict[torch.device, Tensor] = {}
        whole = trainable is None or trainable is model  # DDP's reducer needs the eager backward
        self._trace_backward = whole and traces_backward(trace_backward)
        self._fn = torch.compile(self._step, mode=mode) if compile else self._step

    @property
    def input_device(self) -> torch.device:
        device = getattr(self.model, "input_device", None)
        return device if device is not None else next(self.model.parameters()).device

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        images, labels, weights = self._padded(images, labels)
        self._refresh_lrs()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)  # the backward must not add to leftover gradients
        if self.cudagraphs:  # the previous step's outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(trace_autograd_ops=True) if self._trace_backward else contextlib.nullcontext():
            loss = self._fn(images, labels, weights)
        return loss.clone()  # a CUDA graph's output is overwritten by the next replay

    def _padded(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The batch on the model's devices at the full batch size, and each sample's loss weight."""
        n, full = labels.shape[0], self.batch_size
        if n > full:
            raise ValueError(f"a batch of {n} samples, but the step was built for at most {full}")
        out_device = getattr(self.model, "output_device", self.input_device)
        images = images.to(self.input_device, non_blocking=True)
        labels = labels.to(out_device, non_blocking=True)
        if out_device not in self._ones:
            self._ones[out_device] = torch.ones(full, device=out_device)
        weights = self._ones[out_device]
        if n < full:  # the epoch's last batch: zero-weight padding, so the graph's shapes never change
            images = torch.cat([images, images.new_zeros((full - n, *images.shape[1:]))])
            labels = torch.cat([labels, labels.new_zeros(full - n)])
            weights = (torch.arange(full, device=out_device) < n).float()
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels, weights

    def _refresh_lrs(self) -> None:
        """Copy each group's lr into its tensors when it changed (rarely: the schedule's drops)."""
        for g, group in enumerate(self.optimizer.param_groups):
            if self._lr_values.get(g) != group["lr"]:
                for (group_index, _), tensor in self._lrs.items():
                    if group_index == g:
                        tensor.fill_(group["lr"])
                self._lr_values[g] = group["lr"]

    def _step(self, images: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
        """Forward, the weighted mean cross-entropy, backward and the update (what is compiled)."""
        device = self.input_device
        dtype = self.autocast_dtype
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            logits = self.trainable(images)
        per_sample = F.cross_entropy(logits.float(), labels, reduction="none")  # fp32, as train_step
        loss = (per_sample * weights).sum() / weights.sum().clamp_min(1.0)
        loss.backward()
        with torch.no_grad():
            for params, velocities, g, device, momentum, decay in self._buckets:
                grads = [p.grad for p in params]
                paper_update_(params, grads, velocities, self._lrs[g, device], momentum, decay)
            for params, *_ in self._buckets:
                for p in params:
                    p.grad = None
        return loss.detach()


class CompiledEval(nn.Module):
    """``model``'s forward for evaluation, compiled once: every call is padded to ``batch_size``
    images (the evaluation batch times its views), so the epoch's last, shorter batch does not
    recompile.  It is a separate compiled function from :class:`CompiledStep`'s, so evaluating
    never invalidates the training graph (compiling the model itself, ``nn.Module.compile``,
    recompiles when it switches between training and evaluation, as it does for a batch of another
    size: the epoch's short last batch made one 38-s log window on an H200, docs/benchmarks.md
    "GPU numbers").  Pass it to ``model.evaluate`` in place of the model."""

    def __init__(self, model: nn.Module, batch_size: int, *, mode: CompileMode = "default", compile: bool = True):
        super().__init__()
        self.model, self.batch_size = model, batch_size
        self.cudagraphs = compile and uses_cudagraphs(mode)
        self._fn = torch.compile(self.model, mode=mode) if compile else self.model

    @property
    def input_device(self) -> torch.device:
        device = getattr(self.model, "input_device", None)
        return device if device is not None else next(self.model.parameters()).device

    def forward(self, images: Tensor) -> Tensor:
        n = images.shape[0]
        if n > self.batch_size:
            raise ValueError(f"{n} images in one evaluation call, but it was built for at most {self.batch_size}")
        layout = torch.channels_last if images.dim() == 4 and images.is_contiguous(
            memory_format=torch.channels_last) and not images.is_contiguous() else torch.contiguous_format
        if n < self.batch_size:
            images = torch.cat([images, images.new_zeros((self.batch_size - n, *images.shape[1:]))])
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self._fn(images.contiguous(memory_format=layout))[:n].clone()
