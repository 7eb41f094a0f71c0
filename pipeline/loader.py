"""The PyTorch-facing DALI loader: (images, labels) batches on the target device, exact epochs,
``len()`` in batches, and mid-epoch resume through DALI pipeline checkpointing.

Each batch is DALI's uint8 output (``RawBatch``) taken by ``pipeline.iterator.DaliIterator`` and
normalised by ``pipeline.normalize.DeviceNormalizer`` on the target device.

Buffer ownership: the pipelines run with ``exec_dynamic=True``, and then DALI does NOT copy: the
iterator hands out DALI-owned buffers through DLPack (``torch.from_dlpack``), and DALI may reuse
a buffer once the last reference to it is gone.  On the CPU every use of a batch (normalising it,
parsing its labels) is finished before the next batch is asked for, so references are enough.
On a GPU the reads are kernels queued on PyTorch's stream that may run long after the host has
moved on, while DALI frees in its own stream order; so every GPU batch is held
(``_GpuKeepAlive``) until an event recorded after its consumer's kernels has completed.  Held is
every output DALI handed out, not what ``RawBatch`` keeps.  Nothing reads a batch after that:
the normalised images and the parsed labels are new tensors.  The label bytes are host memory on
every graph (``pipeline.graph``): parsed and checked on the host, then copied to the device.
"""
from __future__ import annotations

import base64
import hashlib
from collections import deque
from pathlib import Path
from typing import Iterator

import torch

from pipeline.graph import EVAL_OUTPUTS, READER, TRAIN_OUTPUTS, GraphSpec, build_pipeline
from pipeline.iterator import DaliIterator
from pipeline.labels import ascii_ints_torch, key_numbers
from pipeline.normalize import DeviceNormalizer, RawBatch, to_device

# 3: the DALI checkpoint without DALIGenericIterator's counters (the position is epoch + batches).
# 2: the same graph, saved through DALIGenericIterator: its checkpoints load the same way.
STATE_VERSION = 3
LOADABLE_VERSIONS = (2, 3)


def device_id_for(device: torch.device) -> int | None:
    """DALI's device_id: None (CPU-only mode, no CUDA at all) unless ``device`` is a GPU."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


class _GpuKeepAlive:
    """Keep DALI-owned GPU batches alive until the GPU has run the kernels that read them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._held: deque[tuple[torch.cuda.Event, object]] = deque()

    def hold(self, batch: object) -> None:
        """Call after the consumer queued its reads of ``batch`` on the loader device's current
        stream.  That device's, not the current device's: a process given ``cuda:1`` without
        ``torch.cuda.set_device`` would otherwise record on cuda:0 and free the batch early."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._held.append((event, batch))
        while self._held and self._held[0][0].query():  # query() never blocks
            self._held.popleft()

    def __del__(self) -> None:
        """A loader let go of (a finished evaluation, a rebuilt pipeline) must not free batches
        that queued kernels still read: DALI's memory pool is shared by the device's pipelines."""
        try:
            if not torch.cuda.is_current_stream_capturing():  # a wait would break a CUDA graph's capture
                for event, _ in self._held:
                    event.synchronize()
        except Exception:  # interpreter shutdown: CUDA may be gone already, and so is every reader
            pass


def graph_kind(spec: GraphSpec) -> str:
    """Which training graph a loader state belongs to (their DALI checkpoints differ)."""
    return "gpu-roi" if spec.gpu and spec.cfg.gpu_roi_decode else "gpu" if spec.gpu else "cpu"


def tar_list(spec: GraphSpec) -> str:
    """Which tars a loader state belongs to (a digest of their names, not paths: the shard
    directory may move).  DALI applies a position to another tar list without a word, e.g. once
    a corrupt shard is left out (measured: a state taken 48 samples into a 144-sample epoch
    continued with 76 samples on 124)."""
    return hashlib.sha256("\n".join(Path(t).name for t in spec.tars).encode()).hexdigest()[:16]


def _encode(checkpoint: bytes | str) -> str:
    """DALI checkpoints are bytes; keep the state JSON-serialisable."""
    raw = checkpoint.encode() if isinstance(checkpoint, str) else checkpoint
    return base64.b64encode(raw).decode("ascii")


def _decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


class DaliLoader:
    """Iterate one rank's part of a split; every sample of the split once per epoch over all ranks.

    The reader pads the last batch (so all ranks run in lockstep) and the iterator's PARTIAL
    policy cuts the padding off, so padded samples never reach the consumer.  Consequence: with
    uneven shards a rank's last batch is short and may even be EMPTY (0 samples); every rank
    still yields ``len()`` batches, so collective ops stay in step.  Consumers must weight
    losses/metrics by the batch's sample count (and skip the forward pass on an empty batch).
    """

    def __init__(self, spec: GraphSpec, device: torch.device | str = "cpu", rank: int = 0,
                 ids: bool = False) -> None:
        self.spec, self.rank, self.ids = spec, rank, ids
        self.device = torch.device(device)
        self.normalizer = DeviceNormalizer(spec.stats, spec.cfg).to(self.device)
        self.epoch = 0
        self._batches = 0  # batches delivered in the current epoch
        self._keepalive = _GpuKeepAlive(self.device) if self.device.type == "cuda" else None
        self._it = self._iterator(None)

    def _iterator(self, checkpoint: bytes | None) -> DaliIterator:
        pipe = build_pipeline(self.spec, device_id_for(self.device), self.rank, checkpoint)
        names = TRAIN_OUTPUTS if self.spec.train else EVAL_OUTPUTS
        return DaliIterator(pipe, READER, names, self.spec.cfg.handover)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the last one may be short)."""
        return len(self._it)

    @property
    def samples(self) -> int:
        """Real samples this rank delivers in the current epoch (padding excluded).

        With uneven shards this differs between ranks (and, for training, between epochs: DALI
        moves each rank to the next shard every epoch); ``len()`` is the same on every rank.
        """
        return self._it.samples(self.epoch)

    def raw_batches(self) -> Iterator[RawBatch]:
        """The epoch as DALI delivers it: uint8 crops (on the GPU with mixed decode) and draws,
        before normalisation.  ``__iter__`` is this plus ``self.normalizer``."""
        for batch in self._it.epoch(self.epoch, self._batches):
            self._batches += 1
            raw = self._raw(batch)
            try:
                yield raw
            finally:  # the consumer queued its reads of ``raw``, also if it stops here (close, break)
                if self._keepalive is not None:
                    self._keepalive.hold(batch)
        self.epoch += 1
        self._batches = 0

    def _raw(self, out: dict[str, torch.Tensor]) -> RawBatch:
        """Parse and check the label bytes (host bytes on every graph: the check makes the host
        wait for no device) and, if asked, the ids (host bytes too: tests and tools)."""
        labels = ascii_ints_torch(out["labels"])
        self._check_labels(labels)
        ids = torch.from_numpy(key_numbers(out["ids"].numpy())) if self.ids else None
        if not self.spec.train:
            return RawBatch(out["images"], labels, ids)
        return RawBatch(out["images"], labels, ids, out["anchors"], out["mirror"], out["alpha"])

    def _check_labels(self, labels: torch.Tensor) -> None:
        """A label that is no class index is a shard damaged since it was checked (its checksum is
        checked in the background while training starts): ``cross_entropy`` stopped the run with
        an IndexError traceback.  Raised here, inside the loader, the service diagnoses it against
        the manifest and names the shard and the sample.  On the host, on every graph: on a GPU
        the check would make the host wait for the device every batch, so the GPU graphs hand the
        label bytes over on the host (they skipped the check when they copied them to the GPU)."""
        if labels.numel() and int(labels.max()) >= self.spec.classes:
            raise ValueError(f"a {'training' if self.spec.train else 'evaluation'} batch holds label "
                             f"{int(labels.max())}, not a class index (the shards have {self.spec.classes} classes): "
                             "a shard changed after it was written")

    def normalize(self, raw: RawBatch) -> torch.Tensor:
        """Float (N, 3, crop, crop) (or (N, V, 3, crop, crop)) images on ``self.device``."""
        if raw.anchors is None:
            return self.normalizer.views(raw.images, self.spec.views)
        return self.normalizer(raw.images, raw.anchors, raw.mirror, raw.alpha)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield ``(images, labels)`` (``(images, labels, ids)`` with ``ids=True``) until the epoch ends."""
        for raw in self.raw_batches():
            images = self.normalize(raw)
            labels = to_device(raw.labels, self.device)
            if self.ids:
                yield images, labels, to_device(raw.ids, self.device)
            else:
                yield images, labels

    def state_dict(self) -> dict:
        """The loader's position (a DALI checkpoint, taken after the last batch handed out)."""
        if not self.spec.train:
            raise ValueError("only the training loader is checkpointed (evaluation restarts from the top)")
        return {"version": STATE_VERSION, "dali": _encode(self._it.checkpoint()), "epoch": self.epoch,
                "batches": self._batches, **self._identity(), **self._reader_settings()}

    def _identity(self) -> dict:
        """Which rank, shards, seed and graph the position belongs to: saved with it, and compared
        on load (DALI applies a checkpoint to another reader without a word)."""
        return {"rank": self.rank, "num_shards": self.spec.num_shards, "seed": self.spec.cfg.seed,
                "graph": graph_kind(self.spec), "tars": tar_list(self.spec)}

    def _reader_settings(self) -> dict:
        """What the position's meaning depends on besides ranks and tars: ``batches`` counts batches
        of this size, and DALI's checkpoint is of a reader shuffled this way."""
        c = self.spec.cfg
        return {"batch_size": c.batch_size, "shuffle_buffer": c.shuffle_buffer, "shuffle_shards": c.shuffle_shards}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken (same shards, ranks and config).  A state
        taken after the epoch's last batch was handed out, before the loop asked for the next (a
        consumer checkpointing at its last step), continues with the next epoch from its first
        batch: DALI's reader is there already, and the rest of the old epoch, nothing, was an
        empty epoch to the consumer."""
        if state.get("version") not in LOADABLE_VERSIONS:
            raise ValueError(f"loader state version {state.get('version')!r}, expected one of {LOADABLE_VERSIONS}")
        mine = self._identity()
        theirs = {k: state.get(k, "cpu" if k == "graph" else None) for k in mine}
        reader = self._reader_settings()  # not recorded before (an older state): trusted, as then
        mine, theirs = {**mine, **reader}, {**theirs, **{k: state.get(k, v) for k, v in reader.items()}}
        if state["version"] == 2 and not self.spec.excluded:  # before tars were recorded: every tar of the split
            theirs["tars"] = mine["tars"]
        if mine != theirs:
            raise ValueError(f"loader state was saved with {theirs}, this loader has {mine}")
        self._it = self._iterator(_decode(state["dali"]))
        self.epoch, self._batches = int(state["epoch"]), int(state["batches"])
        if self._batches >= len(self):  # saved after the epoch's last batch: the next epoch, whole
            self.epoch, self._batches = self.epoch + 1, 0
