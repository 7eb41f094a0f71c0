"""The reference loader in plain PyTorch: webdataset + Pillow(-SIMD) + DataLoader workers.

Same split of the work as the DALI loader: the workers decode and produce uint8 crop windows
(integer anchors 0..(256-224) equally likely) plus the draws (anchor, mirror with p=0.5, lighting
alpha); the SAME ``pipeline.normalize.DeviceNormalizer`` then flips and does the float part on
the target device.  So DALI-vs-reference comparisons test decode/crop equivalence, and the
normalisation is tested once.  It is the fallback where DALI is missing and the oracle the
tests compare DALI against.  Ranks split a split by sample key (key number mod world size).
"""
from __future__ import annotations

import gc
import io
import math
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline.config import LoaderConfig, rank_seed
from pipeline.normalize import DeviceNormalizer, RawBatch
from pipeline.stats import DatasetStats, load_stats
from pipeline.views import crop_hwc, view_stack

_RNG: np.random.Generator | None = None  # one per DataLoader worker, seeded by torch


def _seed_worker(_: int) -> None:
    global _RNG
    _RNG = np.random.default_rng(torch.initial_seed() % 2**63)


def key_number(key: str) -> int:
    """The sample number in a key like ``train-00000123``."""
    return int(key.rsplit("-", 1)[1])


def index_keys(index_path: Path | str) -> list[str]:
    """Sample keys listed in a DALI ``.idx`` file (member names without their extension)."""
    lines = Path(index_path).read_text().splitlines()[1:]
    return [line.split()[3].split(".", 1)[0] for line in lines if line.strip()]


def decode(jpeg: bytes) -> np.ndarray:
    """HWC uint8 RGB pixels of one JPEG."""
    with Image.open(io.BytesIO(jpeg)) as im:
        return np.asarray(im.convert("RGB"))


class Transform:
    """Decode and crop one sample (a webdataset dict) into uint8 crops, label, id and the draws."""

    def __init__(self, cfg: LoaderConfig, train: bool, views: int) -> None:
        self.cfg, self.train, self.views = cfg, train, views

    def __call__(self, sample: dict) -> tuple[torch.Tensor, ...]:
        """Training: (crop window HWC uint8, label, id, anchors (x, y), mirror, alpha); evaluation:
        (view windows (V, h, w, 3) or (h, w, 3) uint8, label, id); nothing flipped yet."""
        global _RNG
        image = decode(sample["jpg"])
        label, ident = int(sample["cls"]), key_number(sample["__key__"])
        if not self.train:
            crops = view_stack(image, self.cfg.crop, self.views, flip=False)
            return torch.from_numpy(crops[0] if self.views == 1 else crops), label, ident
        h, w = image.shape[:2]
        c = self.cfg.crop
        rng = _RNG if _RNG is not None else (_RNG := np.random.default_rng(self.cfg.seed))
        x0, y0 = (int(v) for v in rng.integers(0, [w - c + 1, h - c + 1]))
        mirror = bool(rng.random() < 0.5)
        alpha = rng.normal(0.0, self.cfg.sigma, 3).astype(np.float32)
        crop = np.ascontiguousarray(crop_hwc(image, x0, y0, c, False))  # the normaliser flips
        return (torch.from_numpy(crop), label, ident, torch.tensor([x0, y0]), int(mirror),
                torch.from_numpy(alpha))


class ReferenceLoader:
    """DataLoader over one rank's samples; the same interface as ``pipeline.loader.DaliLoader``
    without checkpointing, and without its equal ``len()`` on every rank (this one is each rank's
    own samples / batch): a baseline for benchmarks and tests, never fed to data-parallel ranks,
    whose collectives need the same number of steps on each."""

    def __init__(self, tars: list[str], keys: list[str], stats: DatasetStats, cfg: LoaderConfig,
                 rank: int = 0, world_size: int = 1, train: bool = True, views: int = 1,
                 ids: bool = False, device: torch.device | str = "cpu") -> None:
        self.tars, self.cfg, self.rank, self.world_size = tars, cfg, rank, world_size
        self.train, self.views, self.ids, self.device = train, views, ids, torch.device(device)
        self.transform = Transform(cfg, train, views)
        self.normalizer = DeviceNormalizer(stats, cfg).to(self.device)
        self.samples = sum(1 for k in keys if key_number(k) % world_size == rank)
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.samples / self.cfg.batch_size)

    def _dataset(self, rng: np.random.Generator) -> wds.WebDataset:
        urls = list(self.tars)
        if self.train and self.cfg.shuffle_shards:
            rng.shuffle(urls)

        def mine(sample: dict) -> bool:
            return key_number(sample["__key__"]) % self.world_size == self.rank
        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False).select(mine)
        if self.train:
            ds = ds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer,
                            rng=random.Random(int(rng.integers(2**62))))
        return ds.map(self.transform)

    def raw_batches(self) -> Iterator[RawBatch]:
        """One epoch of uint8 crops + draws, in batches of ``batch_size`` (before normalisation)."""
        seed = rank_seed(self.cfg.seed, self.rank) * 1009 + self.epoch
        rng = np.random.default_rng(seed)
        workers = min(self.cfg.num_threads, len(self.tars))
        # The workers are forked: collect unreachable objects first, or a worker's garbage
        # collector may run a dead DALI pipeline's destructor and hang on its copied locks.
        gc.collect()
        loader = torch.utils.data.DataLoader(
            self._dataset(rng), batch_size=self.cfg.batch_size, num_workers=workers,
            worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(seed),
            persistent_workers=False, prefetch_factor=4 if workers else None)
        if workers == 0:
            _seed_worker(0)
        for parts in _rebatch(loader, self.cfg.batch_size):
            yield RawBatch(*parts)
        self.epoch += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """``(images, labels[, ids])`` on ``device``, normalised like the DALI loader's."""
        for raw in self.raw_batches():
            images = self.normalize(raw)
            labels = raw.labels.to(self.device)
            yield (images, labels, raw.ids.to(self.device)) if self.ids else (images, labels)

    def normalize(self, raw: RawBatch) -> torch.Tensor:
        """The shared normaliser, exactly as ``pipeline.loader.DaliLoader.normalize``."""
        if raw.anchors is None:
            return self.normalizer.views(raw.images, self.views)
        return self.normalizer(raw.images, raw.anchors, raw.mirror, raw.alpha)


def _rebatch(batches, size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Full batches of ``size`` from the workers' batches (each worker ends on a short one),
    so that ``len()`` holds and only the epoch's last batch is short."""
    pending: list[tuple[torch.Tensor, ...]] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += len(batch[1])
        while held >= size:
            joined = [torch.cat(parts) for parts in zip(*pending)]
            yield tuple(t[:size] for t in joined)
            rest = tuple(t[size:] for t in joined)
            held -= size
            pending = [rest] if held else []
    if held:
        yield tuple(torch.cat(parts) for parts in zip(*pending))


def build_reference_loader(shards_dir: Path | str, rank: int = 0, world_size: int = 1,
                           device: torch.device | str = "cpu", config: LoaderConfig | None = None,
                           *, train: bool = True, views: int = 1, split: str | None = None,
                           ids: bool = False) -> ReferenceLoader:
    """The plain-PyTorch loader for ``split`` (default: train if ``train`` else val)."""
    from shards.manifest import load

    split = split or ("train" if train else "val")
    cfg = (config or LoaderConfig()).validate()
    manifest = load(shards_dir, splits=(split, "train") if split != "train" else ("train",))
    shards = manifest.splits[split].shards
    keys = [k for s in shards for k in index_keys(s.index)]
    return ReferenceLoader([str(s.tar) for s in shards], keys, load_stats(manifest.stats_path), cfg,
                           rank, world_size, train, views, ids, device)
