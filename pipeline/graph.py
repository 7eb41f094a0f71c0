"""The DALI graphs: the per-sample, data-dependent half of the pipeline, all in uint8.

Training: read, decode the random 224x224 window and draw the flip and the lighting alpha.
On the CPU the decode is ONLY the window (``decoders.image_slice``: libjpeg-turbo ROI decode,
optionally with its fast IDCT, ``LoaderConfig.fast_idct``).  On a GPU the whole 256x256 image is
decoded with nvJPEG (``device="mixed"``) and the window sliced at the same integer anchor:
nvImageCodec 0.9's GPU ROI decode can crash the process on H100 (``LoaderConfig.gpu_roi_decode``
explains), and on 256x256 images the ROI saving on a GPU is small.  Outputs the uint8 NHWC
windows plus the draws (anchor x/y in pixels, mirror, alpha); on a GPU the draws are copied to
the GPU inside the graph, so the consumer never copies them from host memory.  The label bytes
stay on the host, where the reader read them: the loader checks every label against the class
count there without waiting for the device, then copies the parsed labels from pinned memory
(``pipeline.normalize.to_device``, queued like a kernel).  On the GPU a label past the class
count was unchecked: checking it there needs the host to wait for the device every batch.  The flip
and the float arithmetic (mean image at the anchor, lighting, CHW, dtype) are
``pipeline.normalize`` on the target device: ``fn.flip`` cost ~15% of DALI's CPU time per image
(docs/benchmarks.md "Pipeline"), a reversed read there costs nothing.
Evaluation: decode the full image and slice the 1 or 10 view windows in uint8 at the integer
anchors of ``pipeline.views.view_anchors`` (the normaliser uses the same integers).

Labels and ids leave the graph as raw ASCII bytes (zero-padded to the batch's longest) and are
parsed in the loader (``pipeline.labels``): DALI has no string-to-int operator, and the ~10
arithmetic operators that emulated one cost ~15% of the CPU time per image.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from pipeline.config import LoaderConfig, rank_seed
from pipeline.stats import DatasetStats
from pipeline.views import view_anchors

READER = "Reader"
TRAIN_OUTPUTS = ("images", "labels", "ids", "anchors", "mirror", "alpha")
EVAL_OUTPUTS = ("images", "labels", "ids")


@dataclass(frozen=True)
class GraphSpec:
    """Everything one rank's graph depends on.  No defaults: ``pipeline._spec`` alone makes one,
    from the manifest (the image size is the shards', not a second copy of ``make shards``')."""

    tars: tuple[str, ...]
    indexes: tuple[str, ...]
    stats: DatasetStats
    cfg: LoaderConfig
    image_size: int
    classes: int  # the manifest's: a label outside 0..classes-1 is a damaged shard (pipeline.loader)
    shard_id: int
    num_shards: int
    gpu: bool  # mixed decode + GPU operators (needs a device_id)
    train: bool
    views: int  # eval only: 1 (centre) or 10 (4 corners + centre, and their flips)
    debug: bool  # also return the full decoded image (tests)
    excluded: int  # tars of the split left out of ``tars`` (shards found corrupt)


def _reader(spec: GraphSpec):
    """Encoded JPEGs, the raw ``.cls`` bytes and the raw source info (``<tar>:<offset>:<key>.jpg``),
    both zero-padded to the batch's longest so they leave the graph as one array each."""
    jpg, cls = fn.readers.webdataset(
        paths=list(spec.tars), index_paths=list(spec.indexes), ext=["jpg", "cls"],
        missing_component_behavior="error",  # a sample without its label is a broken shard
        random_shuffle=spec.train, initial_fill=spec.cfg.shuffle_buffer,
        **_shard_order(spec),
        shard_id=spec.shard_id, num_shards=spec.num_shards,
        stick_to_shard=not spec.train,  # eval: each rank always reads the same part
        pad_last_batch=True,  # every rank runs the same number of batches; the iterator drops pads
        # Plain reads, not mmap: a tar truncated or deleted under a running pipeline then fails
        # with an error naming the file; through mmap it killed the process with SIGBUS.
        dont_use_mmap=True,
        name=READER,
    )
    info = fn.get_property(jpg, key="source_info")
    return jpg, fn.pad(cls, fill_value=0, axes=(0,)), fn.pad(info, fill_value=0, axes=(0,))


def _shard_order(spec: GraphSpec) -> dict:
    """Reshuffle the tar order each epoch (training); the seed is the same on every rank so
    the ranks' partitions stay disjoint."""
    if not (spec.train and spec.cfg.shuffle_shards):
        return {}
    return {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": spec.cfg.seed + 1}


def _decoder_args(spec: GraphSpec, device: str | None = None) -> dict:
    """Decoder settings: mixed (nvJPEG) with a GPU, with the CPU decoder's chroma upsampling so
    the pixels match the ones the mean image was computed from; the fast IDCT for training
    crops if asked (it applies to libjpeg-turbo, also nvJPEG's fallback)."""
    args = {"output_type": types.RGB, "use_fast_idct": spec.train and spec.cfg.fast_idct}
    if device is None and spec.gpu:
        return {**args, "device": "mixed", "hw_decoder_load": spec.cfg.hw_decoder_load,
                "jpeg_fancy_upsampling": spec.cfg.jpeg_fancy_upsampling}
    return {**args, "device": "cpu"}


def _to_consumer(spec: GraphSpec, *nodes):
    """The graph's small outputs where the consumer needs them: on the GPU when there is one."""
    return tuple(n.gpu() for n in nodes) if spec.gpu else nodes


def _train_window(spec: GraphSpec, jpg, anchors):
    """The uint8 crop window at ``anchors`` (x, y): ROI decode on the CPU (or on the GPU when
    ``gpu_roi_decode``), else a whole-image GPU decode sliced at the same integers."""
    shape = [spec.cfg.crop, spec.cfg.crop]  # "WH" order, like start = (x, y)
    if not spec.gpu or spec.cfg.gpu_roi_decode:
        return fn.decoders.image_slice(jpg, start=anchors, shape=shape, **_decoder_args(spec))
    return fn.slice(fn.decoders.image(jpg, **_decoder_args(spec)), start=anchors, shape=shape)


def train_graph(spec: GraphSpec):
    """images (N, crop, crop, 3) uint8, labels/ids raw bytes, anchors (N, 2) int32 (x, y pixels),
    mirror (N,) int32, alpha (N, 3) float32 [+ the full decode, debug only]."""
    jpg, labels, ids = _reader(spec)
    # Integer anchors 0..(size - crop), every one equally likely (x and y drawn independently).
    span = spec.image_size - spec.cfg.crop
    anchors = fn.random.uniform(values=list(range(span + 1)), shape=[2], dtype=types.INT32)
    crop = _train_window(spec, jpg, anchors)
    mirror = fn.random.coin_flip(probability=0.5)  # applied by the normaliser
    alpha = fn.random.normal(shape=[3], stddev=spec.cfg.sigma)
    outputs = (crop, labels, ids, *_to_consumer(spec, anchors, mirror, alpha))  # labels: host (module docstring)
    if spec.debug:
        outputs += (fn.decoders.image(jpg, **_decoder_args(spec, "cpu")),)  # the CPU decoder, as the stats
    return outputs


def eval_graph(spec: GraphSpec):
    """images (N, crop, crop, 3) for 1 view or (N, 10, crop, crop, 3) uint8 view windows (not
    flipped: the normaliser flips views 5..9); labels/ids raw bytes."""
    jpg, labels, ids = _reader(spec)
    decoded = fn.decoders.image(jpg, **_decoder_args(spec))
    size, crop = spec.image_size, spec.cfg.crop
    crops = [fn.slice(decoded, start=[x, y], shape=[crop, crop])
             for x, y, _ in view_anchors(spec.views, size, size, crop)]
    images = crops[0] if len(crops) == 1 else fn.stack(*crops, axis=0)
    outputs = (images, labels, ids)  # labels on the host, checked there (module docstring)
    return outputs + (decoded,) if spec.debug else outputs


def affinity_mask(cores: set[int], threads: int) -> str:
    """DALI_AFFINITY_MASK for ``spare_core``: one core per DALI worker thread (thread i gets entry
    i; DALI ignores a mask shorter than its pool), cycling through every usable core but the last,
    which is left to the training thread.  Only DALI's threads are bound: pinning the training
    thread itself would be inherited by every thread and process it starts later, torch.compile's
    compile workers included."""
    usable = sorted(cores)
    spare = usable[:-1] or usable
    return ",".join(str(spare[i % len(spare)]) for i in range(threads))


def build_pipeline(spec: GraphSpec, device_id: int | None, rank: int = 0,
                   checkpoint: bytes | None = None) -> Pipeline:
    """The built DALI pipeline of one rank (checkpointing enabled for training)."""
    graph = train_graph if spec.train else eval_graph
    pinned = spec.cfg.affinity == "spare_core"
    if pinned:  # read by DALI's thread pool as it starts (pipe.build)
        os.environ["DALI_AFFINITY_MASK"] = affinity_mask(os.sched_getaffinity(0), spec.cfg.num_threads)
    pipe = pipeline_def(graph, enable_conditionals=False)(
        spec, batch_size=spec.cfg.batch_size, num_threads=spec.cfg.num_threads, device_id=device_id,
        seed=rank_seed(spec.cfg.seed, rank), prefetch_queue_depth=spec.cfg.prefetch, exec_dynamic=True,
        enable_checkpointing=spec.train, checkpoint=checkpoint, set_affinity=pinned)
    pipe.build()
    return pipe
