"""The DALI graphs: training (random crop, flip, PCA lighting, mean subtraction) and evaluation.

One graph function per purpose builds both the CPU-only graph (``device_id=None``, CPU decode)
and the GPU graph (``device="mixed"`` nvJPEG decode, GPU crop/normalize); random draws and the
lighting arithmetic are tiny per-sample tensors and stay on the CPU as operator arguments.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from pipeline.config import LoaderConfig, rank_seed
from pipeline.stats import DatasetStats
from pipeline.views import eval_views

READER = "Reader"
TRAIN_OUTPUTS = ("images", "labels", "ids")
DEBUG_OUTPUTS = ("decoded", "pos_x", "pos_y", "mirror", "alpha")
KEY_DIGITS = 8  # keys are "<split>-NNNNNNNN" (shards.write_split)
CLS_WIDTH = 6  # class indices have at most this many ASCII digits
_DALI_DTYPE = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT}


@dataclass(frozen=True)
class GraphSpec:
    """Everything one rank's graph depends on."""

    tars: tuple[str, ...]
    indexes: tuple[str, ...]
    stats: DatasetStats
    cfg: LoaderConfig
    image_size: int = 256
    shard_id: int = 0
    num_shards: int = 1
    gpu: bool = False  # mixed decode + GPU operators (needs a device_id)
    train: bool = True
    views: int = 1  # eval only: 1 (centre) or 10 (4 corners + centre, and their flips)
    debug: bool = False  # also return the decoded image and the random draws (tests)


def _reader(spec: GraphSpec):
    """Encoded JPEGs, ``.cls`` bytes, and the sample id parsed from the tar member name."""
    jpg, cls = fn.readers.webdataset(
        paths=list(spec.tars), index_paths=list(spec.indexes), ext=["jpg", "cls"],
        missing_component_behavior="error",  # a sample without its label is a broken shard
        random_shuffle=spec.train, initial_fill=spec.cfg.shuffle_buffer,
        **_shard_order(spec),
        shard_id=spec.shard_id, num_shards=spec.num_shards,
        stick_to_shard=not spec.train,  # eval: each rank always reads the same part
        pad_last_batch=True,  # every rank runs the same number of batches; the iterator drops pads
        name=READER,
    )
    return jpg, _ascii_int(cls, CLS_WIDTH), _sample_id(jpg)


def _shard_order(spec: GraphSpec) -> dict:
    """Reshuffle the tar order each epoch (training); the seed is the same on every rank so
    the ranks' partitions stay disjoint."""
    if not (spec.train and spec.cfg.shuffle_shards):
        return {}
    return {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": spec.cfg.seed + 1}


def _ascii_int(text, width: int):
    """int64 value of a 1..width digit ASCII string (DALI has no string-to-int operator)."""
    # Right-padding with '0' multiplies the value by 10**(width - n); divide it back out.
    padded = fn.pad(text, fill_value=48, axes=(0,), shape=(width,))
    digits = fn.cast(padded, dtype=types.INT64) - 48
    weights = types.Constant(np.array([10 ** (width - 1 - i) for i in range(width)], np.int64))
    scaled = fn.reductions.sum(digits * weights, axes=0)
    n = text.shape(dtype=types.INT64)[0]
    pow10 = fn.lookup_table(width - n, keys=list(range(width + 1)),
                            values=[float(10 ** k) for k in range(width + 1)], dtype=types.INT64)
    return fn.reshape(scaled // pow10, shape=[1])


def _sample_id(jpg):
    """The number in the sample key, from the source info ``<tar>:<offset>:<key>.jpg``."""
    info = fn.get_property(jpg, key="source_info")
    end = info.shape(dtype=types.INT64)[0] - 4  # drop ".jpg"
    digits = fn.slice(info, fn.cast(end - KEY_DIGITS, dtype=types.FLOAT), types.Constant(float(KEY_DIGITS)),
                      axes=[0], normalized_anchor=False, normalized_shape=False)
    return _ascii_int(digits, KEY_DIGITS)


def _decode(jpg, spec: GraphSpec):
    if spec.gpu:
        return fn.decoders.image(jpg, device="mixed", output_type=types.RGB,
                                 hw_decoder_load=spec.cfg.hw_decoder_load)
    return fn.decoders.image(jpg, device="cpu", output_type=types.RGB)


def _centered(images, spec: GraphSpec):
    """In mean-image mode, subtract the per-pixel mean before cropping (same crop, same flip)."""
    if spec.cfg.normalize != "mean_image":
        return images
    mean = types.Constant(spec.stats.mean_image, device="gpu" if spec.gpu else "cpu")
    # Arithmetic drops the layout; crop_mirror_normalize needs it.
    return fn.reshape(images - mean, layout="HWC")


def _cmn(images, spec: GraphSpec, pos_x, pos_y, mirror, shift):
    """Crop, flip and convert to CHW; ``shift`` (per channel) is added before normalising."""
    if spec.cfg.normalize == "channel":
        mean, std = types.Constant(spec.stats.mean) - shift, spec.stats.std.tolist()
    else:
        mean, std = -shift if shift is not None else [0.0], [1.0]
    return fn.crop_mirror_normalize(
        images, crop=(spec.cfg.crop, spec.cfg.crop), crop_pos_x=pos_x, crop_pos_y=pos_y, mirror=mirror,
        mean=mean, std=std, dtype=_DALI_DTYPE[spec.cfg.dtype], output_layout="CHW")


def _positions(spec: GraphSpec):
    """Integer anchors 0..(size - crop), all equally likely, as crop_pos in [0, 1]."""
    span = spec.image_size - spec.cfg.crop
    draw = lambda: fn.random.uniform(values=[float(v) for v in range(span + 1)])  # noqa: E731
    return draw() / float(max(span, 1)), draw() / float(max(span, 1))


def train_graph(spec: GraphSpec):
    """images (N, 3, crop, crop), labels (N, 1) int64, ids (N, 1) int64 [+ debug outputs]."""
    jpg, labels, ids = _reader(spec)
    decoded = _decode(jpg, spec)
    pos_x, pos_y = _positions(spec)
    mirror = fn.random.coin_flip(probability=0.5)
    alpha = fn.random.normal(shape=[3]) * spec.cfg.sigma
    lm = spec.stats.lighting_matrix
    # offset = L @ alpha, written column by column (see pipeline.stats for the units).
    shift = (types.Constant(lm[:, 0]) * alpha[0] + types.Constant(lm[:, 1]) * alpha[1]
             + types.Constant(lm[:, 2]) * alpha[2])
    images = _cmn(_centered(decoded, spec), spec, pos_x, pos_y, mirror, shift)
    if spec.gpu:
        labels, ids = labels.gpu(), ids.gpu()
    outputs = (images, labels, ids)
    if spec.debug:
        outputs += (decoded, pos_x, pos_y, mirror, alpha)
    return outputs


def eval_graph(spec: GraphSpec):
    """images (N, 3, crop, crop) for 1 view or (N, 10, 3, crop, crop); labels, ids as in training."""
    jpg, labels, ids = _reader(spec)
    decoded = _decode(jpg, spec)
    centered = _centered(decoded, spec)
    crops = [_cmn(centered, spec, x, y, m, None) for x, y, m in eval_views(spec.views)]
    images = crops[0] if len(crops) == 1 else fn.stack(*crops, axis=0)
    if spec.gpu:
        labels, ids = labels.gpu(), ids.gpu()
    outputs = (images, labels, ids)
    return outputs + (decoded,) if spec.debug else outputs


def build_pipeline(spec: GraphSpec, device_id: int | None, rank: int = 0,
                   checkpoint: str | None = None) -> Pipeline:
    """The built DALI pipeline of one rank (checkpointing enabled for training)."""
    graph = train_graph if spec.train else eval_graph
    pipe = pipeline_def(graph, enable_conditionals=False)(
        spec, batch_size=spec.cfg.batch_size, num_threads=spec.cfg.num_threads, device_id=device_id,
        seed=rank_seed(spec.cfg.seed, rank), prefetch_queue_depth=spec.cfg.prefetch, exec_dynamic=True,
        enable_checkpointing=spec.train, checkpoint=checkpoint)
    pipe.build()
    return pipe
