"""Data pipeline: DALI training/evaluation loaders over the WebDataset shards, and a PyTorch fallback.

The training service calls::

    train = build_train_loader(shards_dir, rank, world_size, device, config)
    val = build_eval_loader(shards_dir, rank, world_size, device, config, views=10)

and iterates ``(images, labels)``; see ``average_views`` for 10-view evaluation.

Two stages, split the way fast GPU loaders split the work: the DALI graph (``pipeline.graph``)
does the per-sample, data-dependent work in uint8 (read, decode only the crop window, draw the
flip and the lighting alpha); ``pipeline.normalize.DeviceNormalizer`` does the float arithmetic
(mean image at the crop, lighting, CHW, dtype) on the target device inside the loader.
``loader.raw_batches()`` yields the uint8 stage (``RawBatch``); ``loader.normalize(raw)`` the rest.
"""
from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch

from pipeline.config import LoaderConfig
from pipeline.stats import DatasetStats, load_stats, manifest_stats
from shards.manifest import Manifest

__all__ = ["LoaderConfig", "DatasetStats", "load_stats", "manifest_stats", "build_train_loader", "build_eval_loader",
           "average_views", "dali_available"]


def dali_available() -> bool:
    """True if NVIDIA DALI imports (otherwise use ``pipeline.reference``)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _spec(shards: Path | str | Manifest, split: str, rank: int, world_size: int, device: torch.device,
          config: LoaderConfig, train: bool, views: int, debug: bool, exclude: Collection[str] = (),
          stats: DatasetStats | None = None):
    from shards.manifest import load  # the shard directory contract; fails early with a hint

    from pipeline.graph import GraphSpec
    from pipeline.views import eval_views

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    eval_views(views)  # validates ``views``
    # A Manifest was loaded (and its files checked) by the caller: its index files are read whole,
    # ~100 MB for ImageNet's train split, once per start rather than once per loader.
    manifest = shards if isinstance(shards, Manifest) else \
        load(shards, splits=(split,) if split == "train" else (split, "train"), exclude=exclude)
    stats = manifest_stats(manifest) if stats is None else stats
    if config.crop > manifest.image_size:  # DALI's draw of a train crop's anchor would crash the process
        raise ValueError(f"crop {config.crop} does not fit the shards' {manifest.image_size}-pixel images "
                         f"({manifest.root})")
    shards = [s for s in manifest.splits[split].shards if s.tar.name not in exclude]
    if not shards:
        raise ValueError(f"every {split} shard of {manifest.root} is left out")
    return GraphSpec(
        tars=tuple(str(s.tar) for s in shards), indexes=tuple(str(s.index) for s in shards),
        stats=stats, cfg=config.validate(), image_size=manifest.image_size, classes=manifest.num_classes,
        shard_id=rank, num_shards=world_size, gpu=device.type == "cuda", train=train, views=views,
        debug=debug, excluded=len(manifest.splits[split].shards) - len(shards))


def build_train_loader(shards: Path | str | Manifest, rank: int = 0, world_size: int = 1,
                       device: torch.device | str = "cpu", config: LoaderConfig | None = None,
                       *, ids: bool = False, exclude: Collection[str] = (), stats: DatasetStats | None = None):
    """The training loader of one rank: random crop, flip, PCA lighting, mean subtraction.

    Yields ``(images (N,3,224,224), labels (N,) int64)`` on ``device`` (``(.., ids)`` if ``ids``);
    supports ``len()``, ``state_dict()`` and ``load_state_dict()``.  ``shards``: the shard
    directory, or its ``shards.manifest.Manifest`` already loaded and checked (with ``exclude``,
    and the train split, whose statistics every split uses).  ``exclude``: tar file names left out
    of the reader (shards found corrupt).  ``stats``: the shards' statistics already read by the
    caller (``manifest_stats`` of the same shards), else read here: the service reads them once at
    start for the run identity, and each loader read ``stats.json`` and ``mean_image.npy`` again.
    """
    from pipeline.loader import DaliLoader

    device = torch.device(device)
    spec = _spec(shards, "train", rank, world_size, device, config or LoaderConfig(), True, 1, False, exclude, stats)
    return DaliLoader(spec, device, rank, ids=ids)


def build_eval_loader(shards: Path | str | Manifest, rank: int = 0, world_size: int = 1,
                      device: torch.device | str = "cpu", config: LoaderConfig | None = None,
                      *, views: int = 1, split: str = "val", ids: bool = False, exclude: Collection[str] = (),
                      stats: DatasetStats | None = None):
    """The evaluation loader: centre crop (``views=1``, images (N,3,224,224)) or the paper's 10
    views (``views=10``, images (N,10,3,224,224): 4 corners + centre, then the same flipped);
    the other arguments as ``build_train_loader``'s."""
    from pipeline.loader import DaliLoader

    device = torch.device(device)
    spec = _spec(shards, split, rank, world_size, device, config or LoaderConfig(), False, views, False, exclude, stats)
    return DaliLoader(spec, device, rank, ids=ids)


def average_views(logits: torch.Tensor, views: int) -> torch.Tensor:
    """Mean softmax over the views of each image: logits (N*views, K) -> probabilities (N, K)."""
    probs = torch.softmax(logits.float(), dim=1)
    return probs.reshape(-1, views, probs.shape[1]).mean(dim=1)
