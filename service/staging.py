"""Host copies of a checkpoint's device tensors: the only part of a checkpoint the loop waits for.

The buffers are reused from one checkpoint to the next: a fresh 488 MB host allocation is
touched page by page on its first write (0.65 s on the 2-core VM for AlexNet's weights +
velocities when each checkpoint cloned them), a reused one copies in 0.03 s (an earlier run, no
record).  In ``bench/cpu/service.json`` (docs/benchmarks.md "Service") the first checkpoint of a
process, which allocates the buffers, blocked the loop 93 ms and the later ones 38 ms.  On a
GPU the buffers are pinned, so the device-to-host copies run at full PCIe speed, asynchronously;
``ready()`` then waits for them on EVERY device that held a tensor (an event per device,
recorded on the stream the copies were queued on): waiting for the
current device alone let the writer thread checksum buffers still being filled from a second GPU
(``--device cuda:1``, the towers layout).
Callers must not refill the buffers while a write of their previous contents is in flight
(``CheckpointWriter.wait`` first).
"""
from __future__ import annotations

from typing import Any

import torch


class HostBuffers:
    """Reused host buffers for the tensors of a checkpoint payload."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._devices: set[torch.device] = set()  # devices with copies in flight

    def stage(self, prefix: str, value: Any) -> Any:
        """``value`` (a state dict: nested dicts and lists) with every tensor in a host buffer."""
        if isinstance(value, torch.Tensor):
            return self._copy(prefix, value)
        if isinstance(value, dict):
            return {k: self.stage(f"{prefix}/{k}", v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.stage(f"{prefix}/{i}", v) for i, v in enumerate(value))
        return value

    def _copy(self, name: str, t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            self._buffers[name] = buf
        if t.is_cuda:
            self._devices.add(t.device)
        return buf.copy_(t.detach(), non_blocking=t.is_cuda)

    def ready(self) -> None:
        """Wait for the asynchronous device-to-host copies of every device (a no-op on the CPU)."""
        events = []
        for device in self._devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))  # after the copies queued on it
            events.append(event)
        for event in events:
            event.synchronize()
        self._devices.clear()
