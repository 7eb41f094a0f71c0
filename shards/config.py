"""Settings of ``python -m shards`` / ``make shards`` (TOML file and/or ``--key value`` flags)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError


# Worker processes at most: one per core is the useful number (each writes whole shards), and
# 1024 is above the hardware threads of today's largest two-socket machines (2 x 192 cores x SMT 2
# = 768), as pipeline.config.MAX_THREADS.  100000 forked a process per worker until the open
# files ran out, and the line named the output directory (a disk problem, it seemed).
MAX_WORKERS = 1024
# The side of the shards' images at most.  The network's crops are 224..255 px (the paper's images
# 256); 4096 is 256 times the paper's pixels (a 50 MB image in a worker's memory).  100000 (30 GB
# an image) had the workers killed by the OOM killer half a minute in, the machine's memory gone.
MAX_SIZE = 4096
# A sample's bytes as the shard_bytes-only plan counts them: 32 KiB at 256x256 (q90 photos: ~23 KB).
SAMPLE_BYTES_PER_PIXEL = 0.5


@dataclass(frozen=True)
class ShardConfig:
    """Everything that decides what the sharder writes, and how fast."""

    src: Path = Path("data/sample")  # an ImageNet tree in any supported layout
    out: Path = Path("data/shards")
    val_labels: Path | None = None  # layout (b): the flat val/ label file, when not found automatically
    size: int = 256  # shorter side resized to this, then centre-cropped to size x size (32..4096)
    quality: int = 90  # JPEG quality of the re-encoded images
    shard_samples: int = 5000  # input images per shard (unusable ones leave it short); 0: planned from shard_bytes
    shard_bytes: int = 0  # bytes per tar at most (0: no limit; at least 32768 at size 256); a shard past it is cut into more tars
    seed: int = 0  # the global shuffle of the training split
    workers: int = 0  # processes that write whole shards and compute the statistics; 0 = one per core; at most 1024
    max_skipped_fraction: float = 0.001  # fail when more of the inputs than this are unusable
    chunk: int = 128  # images per statistics task (the statistics do not depend on it)
    stats_images: int = 20000  # training images the statistics are computed over (0: all)

    def validate(self) -> "ShardConfig":
        """Reject settings that cannot work, naming the key."""
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"quality must be 1..100, got {self.quality}")
        if not 32 <= self.size <= MAX_SIZE:
            raise ConfigError(f"size must be 32..{MAX_SIZE}, got {self.size}")
        if self.shard_samples < 0 or self.shard_bytes < 0 or self.shard_samples == self.shard_bytes == 0:
            raise ConfigError(f"shard_samples {self.shard_samples}, shard_bytes {self.shard_bytes}: set either or both "
                              "to a positive limit (0: no limit of that kind)")
        if 0 < self.shard_bytes < self.sample_bytes:
            raise ConfigError(f"shard_bytes {self.shard_bytes} is less than one {self.size}x{self.size} image as planned "
                              f"({self.sample_bytes} bytes): every tar would hold one image, over the limit; give a "
                              f"tar's limit in bytes, at least {self.sample_bytes} (1000000000: 1 GB), or 0 for none")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ConfigError(f"max_skipped_fraction must be within 0..1, got {self.max_skipped_fraction}")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers must be in 0..{MAX_WORKERS} (0 = one per core; more processes than cores "
                              f"only contend), got {self.workers}")
        for key, least in (("chunk", 1), ("stats_images", 0), ("seed", 0)):
            if getattr(self, key) < least:
                raise ConfigError(f"{key} must be at least {least}, got {getattr(self, key)}")
        return self

    @property
    def sample_bytes(self) -> int:
        """One sample's bytes as planned (``SAMPLE_BYTES_PER_PIXEL``), and the least ``shard_bytes``
        taken.  Why: a smaller limit was silently accepted, each tar then holding one image past it
        (a tar is cut only once it holds an image), one tar per image: 1.3 million for ImageNet."""
        return math.ceil(SAMPLE_BYTES_PER_PIXEL * self.size * self.size)

    @property
    def processes(self) -> int:
        """Worker processes actually used: 0 = one per core this process may run on (a
        container's cpuset or ``taskset`` counts, not the host's core count)."""
        return self.workers or len(os.sched_getaffinity(0))

    def output_parameters(self) -> dict:
        """The settings that determine the bytes written (recorded in the manifest and journal)."""
        return {"size": self.size, "quality": self.quality, "shard_samples": self.shard_samples,
                "shard_bytes": self.shard_bytes, "seed": self.seed}
