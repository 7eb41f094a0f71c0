"""Our own iterator over a built DALI pipeline: exact epochs of one rank's shard, as torch tensors.

Why not ``DALIGenericIterator``: it takes each batch with ``Pipeline.share_outputs()`` and no
stream, which DALI documents as "synchronised with the host": the training thread waits on a CUDA
event until DALI's GPU work for that batch has run.  DALI's streams are non-blocking, so that work
is not queued behind the training stream's kernels, but it shares the GPU with them, and while
they fill the GPU a batch not yet done when it is asked for makes the host wait.
``set_sync_debug_mode`` cannot see that wait (it is inside DALI, not a torch call).  With
``handover="stream"`` the outputs are bound to PyTorch's current stream instead
(``share_outputs(cuda_stream=...)``: DALI makes the stream wait for its event, the host does not
wait), so the consumer's kernels are queued after DALI's and the host runs on.  ``"host"`` keeps
the synchronising hand-over (what ``DALIGenericIterator`` does).  Neither waits for the training
stream's own queued kernels (``tests/test_gpu_speed.py``); whether the host's wait for DALI's
unfinished work costs time end to end is a GPU measurement (``make gpu-check``'s sweep).  On the
CPU (no device) both are the same.

The epoch arithmetic is DALI's own, for a reader with ``pad_last_batch=True`` and the PARTIAL
policy (``nvidia.dali.plugin.base_iterator``), computed from the public ``reader_meta``:

* the reader splits the ``epoch_size`` samples into ``number_of_shards`` contiguous shards,
  shard i being samples ``i*N//S`` up to ``(i+1)*N//S`` (sizes differ by at most one);
* every rank reads ``epoch_size_padded // number_of_shards`` samples per epoch (the largest
  shard), in ``ceil(that / batch)`` batches, the reader repeating its last sample as padding;
* the padding is cut off, so a rank's last batch may be short or even empty;
* without ``stick_to_shard`` the reader moves to the next shard every epoch, so a rank reads
  shard ``(shard_id + epoch) % S``.

No state of its own: the caller says which epoch and how many of its batches were delivered
(the loader keeps both in its checkpoint), which is all the arithmetic needs.
"""
from __future__ import annotations

import math
from typing import Iterator, get_args

import torch
from nvidia.dali.pipeline import Pipeline

from pipeline.config import Handover


def shard_sizes(samples: int, shards: int) -> list[int]:
    """Samples in each of ``shards`` contiguous shards of ``samples``, as DALI's readers split them."""
    return [(i + 1) * samples // shards - i * samples // shards for i in range(shards)]


class DaliIterator:
    """Batches of one rank's shard of a built pipeline (with ``exec_dynamic=True``): dicts of
    torch tensors named by ``names``, padding removed, ``len()`` batches per epoch on every rank."""

    def __init__(self, pipe: Pipeline, reader: str, names: tuple[str, ...], handover: Handover = "host") -> None:
        if handover not in get_args(Handover):
            raise ValueError(f"handover must be one of {get_args(Handover)}, got {handover!r}")
        if not pipe.exec_dynamic:  # other executors reuse the buffers once released
            raise ValueError("the pipeline must run with exec_dynamic=True "
                             "(DALI then never reuses a handed-out buffer)")
        meta = pipe.reader_meta(reader)
        if not meta["pad_last_batch"]:
            raise ValueError(f"reader {reader!r} must pad the last batch (pad_last_batch=True): every rank "
                             "then runs the same number of batches")
        self.pipe, self.names = pipe, names
        self.batch_size = pipe.max_batch_size
        self.handover = handover
        self._shards, self._shard_id = int(meta["number_of_shards"]), int(meta["shard_id"])
        self._stick = bool(meta["stick_to_shard"])
        self._sizes = shard_sizes(int(meta["epoch_size"]), self._shards)
        self._per_rank = int(meta["epoch_size_padded"]) // self._shards  # real samples + padding
        self._scheduled = False

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank; the last may be short or empty)."""
        return math.ceil(self._per_rank / self.batch_size)

    def samples(self, epoch: int) -> int:
        """Real samples this rank reads in ``epoch`` (0-based): the size of the shard it reads then."""
        shard = self._shard_id if self._stick else (self._shard_id + epoch) % self._shards
        return self._sizes[shard]

    def epoch(self, epoch: int, done: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of ``epoch`` after its first ``done`` batches; exhausting it ends the epoch."""
        if not self._scheduled:  # the first call fills the prefetch queue
            self.pipe.schedule_run()
            self._scheduled = True
        real = self.samples(epoch)
        for index in range(done, len(self)):
            outputs = self._take()
            keep = real - index * self.batch_size  # <= 0: a batch of padding only
            if keep < self.batch_size:
                outputs = {k: v[:max(keep, 0)] for k, v in outputs.items()}
            yield outputs
        self.pipe.reset()  # a no-op for readers (they never run dry); kept as DALI's iterator does
        if self.pipe.empty():
            self.pipe.schedule_run()

    def _take(self) -> dict[str, torch.Tensor]:
        """One batch as torch tensors (DLPack, no copy), then the next run is scheduled."""
        if self.pipe.device_id is None:
            return self._take_on(None)
        # The pipeline's device current: the DLPack import makes a stream wait on DALI's event
        # on the current device, so a process given cuda:1 without set_device would reach cuda:0.
        with torch.cuda.device(self.pipe.device_id):
            return self._take_on(torch.cuda.current_stream() if self.handover == "stream" else None)

    def _take_on(self, stream: torch.cuda.Stream | None) -> dict[str, torch.Tensor]:
        batch = self.pipe.share_outputs(cuda_stream=stream)
        if any(len(out) != self.batch_size for out in batch):
            raise RuntimeError(f"DALI returned a batch of {[len(o) for o in batch]} samples, expected "
                               f"{self.batch_size} (the reader pads every batch)")
        tensors = {name: _to_torch(out, bound=stream is not None) for name, out in zip(self.names, batch)}
        self.pipe.release_outputs()  # a no-op with exec_dynamic: the tensors keep their buffers
        self.pipe.schedule_run()
        return tensors

    def checkpoint(self) -> bytes:
        """DALI's checkpoint of the pipeline after the last batch taken (reader position, RNGs)."""
        return self.pipe.checkpoint()


def _to_torch(out, bound: bool) -> torch.Tensor:
    """A DALI output as a torch tensor on its buffer (DLPack).  ``bound``: the outputs were
    taken on PyTorch's stream, and DLPack's stream argument makes that stream wait for DALI's
    work on this buffer.  Otherwise DALI waited on the host already (``share_outputs()`` without
    a stream), and the import says so (``stream=-1``: no synchronisation): with the default, DALI
    would make PyTorch's stream wait for an event recorded on its own stream now, behind the
    batches it has queued since (the prefetch), a wait on work this batch does not need."""
    tensor = out.as_tensor()
    return torch.from_dlpack(tensor if bound else tensor.__dlpack__(stream=-1))
