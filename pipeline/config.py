"""Loader configuration: one frozen dataclass shared by the DALI and the reference loaders."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Literal, get_args

# Batches DALI prepares ahead.  Each is a whole output batch held in memory (128 x 3 x 224 x 224
# float32: 77 MB, per pipeline); 4 is the deepest measured (docs/benchmarks.md "GPU numbers",
# run 3), and gains stop once the queue covers the decode's jitter.  16 leaves room to
# experiment; 100000 asked for terabytes and the process died of it.
MAX_PREFETCH = 16
# DALI CPU threads per pipeline (a rank has two: training and evaluation).  Each decodes and
# augments one sample at a time, so threads beyond the usable cores only take turns on them (the
# default, 0, is one per core; docs/benchmarks.md "GPU numbers": 8 threads with prefetch 4 beat
# 16 on 16 cores, one run each).  1024 is above the hardware threads of today's largest
# two-socket machines (2 x 192 cores x SMT 2 = 768), and a whole epoch ran with it on 2 cores.
# 100000 aborted inside DALI's thread pool (exit 134, "terminate called without an active
# exception", no line naming the key).
MAX_THREADS = 1024
# The PCA lighting sigma at most: 100 times the paper's 0.1.  The offset's spread along the first
# principal component is sigma x eigval_1 / 255 pixel levels (pipeline.stats): 5.5 at ImageNet's
# eigval_1 (0.2175 in 0..1 units, docs/reference.md) and the paper's sigma, ~555 at 10, twice the
# whole 0..255 range; past that the images are noise.  1e6 was trained on without a word.
MAX_SIGMA = 10.0
Normalize = Literal["mean_image", "channel"]
Dtype = Literal["float32", "float16", "bfloat16"]
Handover = Literal["host", "stream"]
Affinity = Literal["none", "spare_core"]
MemoryFormat = Literal["contiguous", "channels_last"]


@dataclass(frozen=True)
class LoaderConfig:
    """How to read, augment and batch the shards (the same for every rank)."""

    batch_size: int = 128
    threads: int = 0  # DALI CPU threads (or reference workers); 0 = every core; at most 1024
    seed: int = 0  # pipeline seed; each rank derives its own from (seed, rank)
    # DALI's initial_fill: local shuffle window, in samples, each held in memory encoded; the service
    # refuses one estimated over a quarter of the memory available at start (service.data_fit)
    shuffle_buffer: int = 1024
    shuffle_shards: bool = True  # visit the tars in a new order every epoch
    sigma: float = 0.1  # std of the PCA lighting draws alpha_j; at most 10 (MAX_SIGMA)
    normalize: Normalize = "mean_image"  # "mean_image" (the paper) or "channel" (mean/std per channel)
    dtype: Dtype = "float32"  # output dtype; float16/bfloat16 only pay off on a GPU
    crop: int = 224
    prefetch: int = 2  # DALI prefetch_queue_depth (batches)
    hw_decoder_load: float = 0.65  # share of JPEGs for the A100/H100 hardware decoder (mixed only)
    # Training crops with libjpeg-turbo's fast integer IDCT (CPU decode): pixels differ from the
    # accurate IDCT by ~1 level on average (at most 8 on the sample shards); the speed-up was
    # within the noise in the full loader on the 2-core machine (0-20% in isolated graphs), so
    # it is off.  Evaluation always decodes with the accurate IDCT.
    fast_idct: bool = False
    # GPU training decode: False (default) decodes the whole 256x256 image with nvJPEG and slices
    # the window at the drawn anchor; True decodes only the window (nvImageCodec ROI decode).
    # nvImageCodec 0.9 (required by DALI 2.4) has an open ROI-decode regression, NVIDIA/nvImageCodec
    # issue #55: error #8 on A100 and a SIGSEGV that kills the process on H100, for ordinary
    # in-bounds windows.  `make gpu-check` probes it in a child process on each card.
    gpu_roi_decode: bool = False
    # nvJPEG's chroma upsampling: True interpolates like libjpeg-turbo (the decoder the mean image
    # and the PCA came from: mean 0.004 levels apart on an H200); False is nvJPEG's default.
    # Whether True keeps images off the hardware decoder is measured by `make gpu-check` (sweep).
    jpeg_fancy_upsampling: bool = True
    # How a GPU batch is handed to PyTorch (pipeline.iterator explains): "host" waits on the host
    # for DALI's GPU work (as DALIGenericIterator does), "stream" makes PyTorch's stream wait.
    handover: Handover = "host"
    # "spare_core": DALI's worker threads are bound to every usable core but the last one, which
    # is left to the training thread (DALI_AFFINITY_MASK + set_affinity); "none": the OS decides.
    # With several ranks on a machine the service gives each rank its own share of the cores first.
    affinity: Affinity = "none"
    # The normalised batch's layout: "channels_last" writes NHWC memory (what a channels_last
    # model reads) instead of NCHW plus a conversion in the training step.  Same values.
    memory_format: MemoryFormat = "contiguous"

    def validate(self) -> LoaderConfig:
        """Return self if every field makes sense, else raise ValueError naming the field."""
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads must be in 0..{MAX_THREADS} (0 = all cores; more threads than cores only "
                             f"contend), got {self.threads}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):  # nan < 0 is False: nan passed before
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma}")
        if self.sigma > MAX_SIGMA:
            raise ValueError(f"sigma must be at most {MAX_SIGMA:g} (the paper's 0.1 x 100: the lighting offset's "
                             f"spread is then ~555 pixel levels at ImageNet's, twice the 0..255 range), got {self.sigma}")
        if self.crop < 1:
            raise ValueError(f"crop must be >= 1, got {self.crop}")
        if not 1 <= self.prefetch <= MAX_PREFETCH:
            raise ValueError(f"prefetch must be in 1..{MAX_PREFETCH} (batches held ahead, each a whole batch "
                             f"in memory), got {self.prefetch}")
        for name, kind in (("normalize", Normalize), ("dtype", Dtype), ("handover", Handover), ("affinity", Affinity),
                           ("memory_format", MemoryFormat)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"{name} must be one of {get_args(kind)}, got {getattr(self, name)!r}")
        if not 0 <= self.hw_decoder_load <= 1:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        return self

    @property
    def num_threads(self) -> int:
        """Threads actually used: ``threads`` or, when 0, the number of usable cores."""
        return self.threads or len(os.sched_getaffinity(0))

    def replace(self, **changes) -> LoaderConfig:
        """A copy with some fields changed (validated)."""
        return replace(self, **changes).validate()


def rank_seed(seed: int, rank: int) -> int:
    """The DALI pipeline seed of one rank: distinct per (seed, rank), stable across runs."""
    # A large odd multiplier keeps (seed, rank) pairs from colliding for realistic values.
    return (seed * 1_000_003 + rank * 7919 + 12345) % (2**31 - 1)
