"""The settings only the shards (and this machine) can judge: checked once ``manifest.json`` is
read and before the model and the loaders are built, each refusal exit 2 naming its key.

- ``loader.crop`` larger than the images fails in the loader.
- ``loader.batch_size`` larger than a rank's share of the images trains nothing, after allocating
  it (100000 images: the kernel's OOM killer); more ranks than a split's images fail in DALI's
  reader, which refuses to split N samples into more than N parts.
- ``loader.shuffle_buffer`` is DALI's ``initial_fill``: the training reader reads that many
  *encoded* samples ahead into memory before its first batch and keeps them there, wrapping round
  the epoch when there are fewer (``nvidia/dali/.../reader/loader/loader.h``).  1,000,000,000 grew
  the process to ~21 GB before the OOM killer ended it without a line (under ``ulimit -v``: exit 1,
  ``std::bad_alloc``, blamed on the data).  The estimate is the buffer x the mean bytes of a
  training sample in the shards (tar bytes / samples, from the manifest); measured on the sample
  shards (23,481 bytes a sample), each buffered sample cost 29.7 KB of resident memory (buffer
  100,000: 3.17 GB peak, 1,024: 0.37 GB), 1.26x the estimate.  A buffer whose estimate is over a
  quarter of the memory available at start (shared by the ranks on this machine) is refused: the
  other three quarters leave room for that overhead, the model, the batches and the rest (the
  demo peaks at 5 GB).  A buffer larger than a rank's images is *not* refused: it only shuffles
  across the epoch boundary, and the default 1024 is more than the sample data's 720 images.
"""
from __future__ import annotations

import math
import os
from collections.abc import Collection
from pathlib import Path

from service.config import TrainConfig
from service.dist import Ranks
from service.errors import EXIT_CONFIG, ServiceError
from shards import manifest as contract

MEMORY_SHARE = 4  # the shuffle buffers may take 1/MEMORY_SHARE of the memory available at start
CGROUP = Path("/sys/fs/cgroup")


def available_memory() -> int:
    """Bytes this process may still allocate: the kernel's MemAvailable (what can be had without
    swapping), or less where a cgroup v2 limit (a container's ``--memory``) leaves less."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # free pages: a floor
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(available, 0)


def shuffle_buffer_problem(buffer: int, sample_bytes: int, available: int, local_ranks: int) -> str | None:
    """Why ``buffer`` samples of ``sample_bytes`` each do not fit the rank's share of
    ``available`` bytes (see the module's docstring), or None when they do."""
    share = available // (MEMORY_SHARE * local_ranks)
    if buffer * sample_bytes <= share:
        return None
    ranks = f", shared by {local_ranks} ranks" if local_ranks > 1 else ""
    return (f"loader.shuffle_buffer {buffer} would hold about {buffer * sample_bytes / 1e9:,.1f} GB of encoded "
            f"training samples in memory ({sample_bytes} bytes each, the shards' mean): more than 1/{MEMORY_SHARE} of "
            f"the {available / 1e9:.1f} GB available on this machine{ranks}: use at most {share // sample_bytes}")


def check_fits_data(cfg: TrainConfig, manifest: contract.Manifest, excluded: Collection[str], ranks: Ranks,
                    available: int | None = None) -> None:
    """Refuse (exit 2, every problem in one line) the settings these shards cannot train with;
    ``available``: the memory to judge the shuffle buffer by (default: ``available_memory()``)."""
    problems, size = [], manifest.image_size
    if cfg.loader.crop > size:
        problems.append(f"loader.crop {cfg.loader.crop} is larger than the {size}x{size} px images of {cfg.shards} "
                        f"(its manifest.json): use at most {size}")
    train = [s for s in manifest.splits["train"].shards if s.tar.name not in excluded]
    images = sum(s.samples for s in train)
    problems += rank_share_problems(cfg, manifest, excluded, ranks.world_size)
    if images:
        sample_bytes = math.ceil(sum(s.bytes for s in train) / images)
        memory = available_memory() if available is None else available
        if problem := shuffle_buffer_problem(cfg.loader.shuffle_buffer, sample_bytes, memory, ranks.local_world_size):
            problems.append(problem)
    if problems:
        raise ServiceError(EXIT_CONFIG, "invalid settings for these shards: " + "; ".join(problems))


def rank_share_problems(cfg: TrainConfig, manifest: contract.Manifest, excluded: Collection[str],
                        world: int) -> list[str]:
    """Each rank's part of each split must hold something: a training batch, and one validation
    image (DALI's reader refuses more ranks than samples, and the service blamed the val shards
    for it after hashing them all: "the failure is elsewhere (memory, DALI, the decoder)")."""
    def images(split: str) -> int:
        return sum(s.samples for s in manifest.splits[split].shards if s.tar.name not in excluded)

    problems, b, (train, val) = [], cfg.loader.batch_size, (images("train"), images("val"))
    if train < world:
        problems.append(f"{cfg.shards} has {train} training images, fewer than the {world} ranks (each needs a "
                        f"batch of its own): start at most {max(train // b, 1)} rank(s) at loader.batch_size {min(b, train)}")
    elif b > train // world:
        problems.append(f"loader.batch_size {b} is more than the {train // world} training images each of the "
                        f"{world} rank(s) gets per epoch from {cfg.shards}: use at most {train // world}")
    if val < world:
        problems.append(f"{cfg.shards} has {val} validation images, fewer than the {world} ranks that each "
                        f"evaluate a part of them: start at most {val} rank(s), or shard more validation images")
    return problems
