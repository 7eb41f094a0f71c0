"""From a validated config to the objects a run trains with: device, model, optimizer, schedule,
gradient scaler and the two loaders.

``resolve`` turns the ``auto`` settings into what this machine and rank will use (saved in the
run directory's config.json), so everything downstream sees concrete values.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.cuda import set_sync
from model import AlexNet, PaperSGD, PlateauSchedule, prepare_model, train_step
from model.optim import param_groups
from model.step import CompiledEval, CompiledStep, uses_cudagraphs
from pipeline import DatasetStats, build_eval_loader, build_train_loader
from service.config import FLOAT32_MAX, TrainConfig, lr_factor
from service.data_errors import diagnose
from service.dist import Ranks, core_share
from service.errors import EXIT_CONFIG, DataError, ServiceError
from service.model_settings import ModelSettings
from service.rng import torch_seed
from shards.manifest import Manifest, ManifestError

if TYPE_CHECKING:
    from service.shard_check import ShardCheck

AUTOCAST = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Parts:
    """Everything the loop trains with."""

    cfg: TrainConfig
    device: torch.device  # where the loaders put batches (tower a's device for towers)
    devices: list[torch.device]  # every device the model lives on (synchronised at log intervals)
    model: torch.nn.Module  # the AlexNet (state dict, evaluation, checkpoints)
    trainable: torch.nn.Module  # what train_step runs: the model, or its DDP replica with several ranks
    optimizer: PaperSGD
    schedule: PlateauSchedule
    scaler: torch.amp.GradScaler | None
    train: object  # pipeline.loader.DaliLoader: iterable, len(), state_dict()
    val: object
    num_classes: int
    lr_rule: str = ""  # the global batch and the lr for it, said in the log and /status
    lr_scale: float = 1.0  # the lr rule's factor at this global batch (checkpoints record it)
    shard_check: ShardCheck | None = None  # polled after each step (a shard found corrupt stops the run)
    # One training step, (images, labels) -> loss: model.train_step by default, or the compiled
    # model.step.CompiledStep (model.compile step).  What evaluation runs: the model, or its
    # compiled evaluation forward.
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    evaluator: torch.nn.Module | None = None

    def __post_init__(self) -> None:
        if self.step is None:
            self.step, self.evaluator = steps_for(self.cfg, self.model, self.trainable, self.optimizer, self.scaler)

    @property
    def autocast(self) -> torch.dtype | None:
        return AUTOCAST[self.cfg.model.autocast]


def resolve(cfg: TrainConfig, ranks: Ranks) -> TrainConfig:
    """``device``/``model.layout``/``model.devices`` as this process will use them, and ``shards`` and
    ``out`` as absolute paths: config.json and the checkpoints record them, and a relative one
    (make demo's data/shards) named nothing once read from another directory (predict)."""
    device = ranks.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ServiceError(EXIT_CONFIG, f"device {cfg.device!r}: {cuda_problem(device)}; use --device cpu or auto")
    m = cfg.model
    if m.autocast == "float16" and device.type != "cuda":
        raise ServiceError(EXIT_CONFIG, "model.autocast float16 needs a CUDA device (with a gradient scaler there); "
                           "on the CPU use bfloat16 or none")
    two_gpus = device.type == "cuda" and torch.cuda.device_count() >= 2 and ranks.world_size == 1
    layout = ("towers" if two_gpus else "grouped") if m.layout == "auto" else m.layout
    devices = m.devices
    if layout == "grouped" and devices and any(_place(d) != _place(device) for d in devices):
        # grouped runs on device alone: towers' devices would be dropped without a word
        raise ServiceError(EXIT_CONFIG, f"model.devices {','.join(devices)} are not used: model.layout grouped runs on "
                           f"device {device}{' (auto chose it here)' if m.layout == 'auto' else ''}: give --device "
                           f"{devices[0]}, or --model.layout towers")
    if layout == "towers" and not devices:
        devices = _tower_devices(device, ranks, two_gpus)
        device = torch.device(devices[0])
    for d in devices:
        if torch.device(d).index is not None and (problem := cuda_problem(torch.device(d))):
            raise ServiceError(EXIT_CONFIG, f"model.devices names {d}, but {problem}")
    model = dataclasses.replace(m, layout=layout, devices=tuple(devices))
    return dataclasses.replace(cfg, device=str(device), model=model, loader=cfg.loader.replace(seed=cfg.seed),
                               shards=Path(os.path.abspath(cfg.shards)), out=Path(os.path.abspath(cfg.out)))


def _place(device: str | torch.device) -> tuple[str, int]:
    """(type, index) of a device, ``cuda`` and ``cpu`` being index 0: the same place however named."""
    d = torch.device(device)
    return d.type, d.index or 0


def cuda_problem(device: torch.device) -> str | None:
    """Why ``device`` cannot be used by this process (None: it can, or it is no CUDA device); the
    service's settings and predict's ``--device`` each add their own advice."""
    if device.type != "cuda":
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return "no CUDA device is visible to this process (torch.cuda.is_available() is False)"
    if (device.index or 0) >= count:
        return f"only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})"
    return None


def apply_cuda_sync(cfg: TrainConfig) -> None:
    """``cuda_sync`` on every GPU this process uses: before anything creates their CUDA context."""
    if cfg.cuda_sync == "auto" or torch.device(cfg.device).type != "cuda":
        return
    for index in sorted({torch.device(d).index or 0 for d in (*cfg.model.devices, cfg.device)}):
        try:
            set_sync(cfg.cuda_sync, index)
        except RuntimeError as exc:
            raise ServiceError(EXIT_CONFIG, f"cuda_sync {cfg.cuda_sync}: {exc}") from None


def compile_note(cfg: TrainConfig) -> str | None:
    """What a resolved ``cfg`` will not get that its settings suggest: CUDA graphs for a model on
    two devices (the towers layout on two GPUs).  Inductor records none for a graph whose tensors
    span devices and runs it without them, saying so only in its log."""
    m = cfg.model
    if m.compile == "off" or not uses_cudagraphs(m.compile_mode) or len(set(m.devices)) < 2:
        return None
    return (f"model.compile_mode {m.compile_mode}: no CUDA graphs for a model on {' and '.join(m.devices)} (a "
            "graph spanning two devices runs without them); model.layout grouped on one GPU keeps them")


def share_cores(cfg: TrainConfig, place: int, peers: int) -> tuple[TrainConfig, set[int] | None]:
    """This rank's part of cores it shares with ``peers`` ranks (``Ranks.core_peers``: ranks on
    this machine allowed the same cores), before any DALI or compile thread starts: ``threads 0``
    (a DALI thread per core) becomes this rank's share of them, not all of them for every rank
    (8 ranks on 16 cores: 2 each, not 16), and with ``loader.affinity spare_core`` the whole
    process runs on its share (its DALI threads, the training thread, torch.compile's workers:
    threads inherit it), so that the ranks do not bind their DALI threads to the same cores.
    Returns the config and, when the process was bound, the cores it was allowed before."""
    cores = os.sched_getaffinity(0)
    share = core_share(cores, place, peers)
    if cfg.loader.threads == 0 and peers > 1:
        cfg = dataclasses.replace(cfg, loader=cfg.loader.replace(threads=len(share)))
    if cfg.loader.affinity != "spare_core" or peers <= 1:
        return cfg, None
    os.sched_setaffinity(0, share)
    return cfg, cores


def _tower_devices(device: torch.device, ranks: Ranks, two_gpus: bool) -> tuple[str, str]:
    """Tower a and b: cuda:0 and cuda:1 for one process; with several ranks, rank r of a node
    gets the pair cuda:2r, cuda:2r+1 (start torchrun with half as many processes as GPUs)."""
    if device.type != "cuda":
        return str(device), str(device)
    if ranks.distributed:
        a = 2 * ranks.local_rank
        if a + 1 >= torch.cuda.device_count():
            raise ServiceError(EXIT_CONFIG, f"model.layout towers with {ranks.world_size} ranks: local rank "
                               f"{ranks.local_rank} needs cuda:{a} and cuda:{a + 1}, but "
                               f"{torch.cuda.device_count()} GPU(s) are visible; use --nproc-per-node "
                               f"{torch.cuda.device_count() // 2} or model.layout grouped")
        return f"cuda:{a}", f"cuda:{a + 1}"
    return ("cuda:0", "cuda:1") if two_gpus else (str(device), str(device))


def alexnet(m: ModelSettings, num_classes: int, layout: str = "grouped", devices: tuple[str, ...] = ()) -> AlexNet:
    """The AlexNet that ``m``'s architecture settings describe, in ``layout``: the one place that maps
    the settings to the model, for the service and for ``service.predict``."""
    return AlexNet(num_classes, layout, devices or None, bias_init=m.bias_init, dropout=m.dropout, lrn=m.lrn,
                   input_channels=m.input_channels)


def build_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The AlexNet of ``cfg.model`` on its device(s), with the paper's initialisation."""
    m = cfg.model
    torch.manual_seed(cfg.seed)  # the same initial weights for the same seed, in both layouts
    if m.layout == "towers":
        model = alexnet(m, num_classes, "towers", m.devices)
    else:
        model = alexnet(m, num_classes).to(cfg.device)
    return prepare_model(model, channels_last=m.channels_last, compile=m.compile == "model")


def steps_for(cfg: TrainConfig, model: torch.nn.Module, trainable: torch.nn.Module, optimizer: PaperSGD,
              scaler: torch.amp.GradScaler | None) -> tuple[Callable, torch.nn.Module]:
    """(the training step, what evaluation runs) for ``cfg.model.compile``: ``model.train_step`` and
    the model itself, or with ``step`` the compiled ``model.step.CompiledStep`` and ``CompiledEval``."""
    m, autocast = cfg.model, AUTOCAST[cfg.model.autocast]
    if m.compile != "step":
        return functools.partial(train_step, trainable, optimizer, autocast_dtype=autocast,
                                 channels_last=m.channels_last, scaler=scaler), model
    step = CompiledStep(model, optimizer, cfg.loader.batch_size, trainable=trainable, autocast_dtype=autocast,
                        channels_last=m.channels_last, mode=m.compile_mode, trace_backward=m.trace_backward)
    return step, CompiledEval(model, cfg.loader.batch_size * cfg.eval_views, mode=m.compile_mode)


def build(cfg: TrainConfig, ranks: Ranks, manifest: Manifest, exclude: Collection[str] = (),
          loaders: bool = True, shard_check: ShardCheck | None = None, stats: DatasetStats | None = None) -> Parts:
    """Model, optimizer, schedule, scaler and loaders of a resolved ``cfg``; the loaders leave
    out the tars named in ``exclude`` (shards found corrupt, by ``shard_check``, which the loop
    polls).  ``loaders=False``: none (``None``), for measuring the step alone
    (``bench.sweep_child``) without two DALI pipelines' threads, memory and decoder state beside it.
    ``stats``: the shards' statistics the caller read (``service.app.start``, for the run identity),
    handed to both loaders so that a start reads ``stats.json`` and ``mean_image.npy`` once."""
    model = build_model(cfg, manifest.num_classes)
    devices = sorted({p.device for p in model.parameters()}, key=str)
    if any(d.type == "cuda" for d in devices):
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        torch.backends.cudnn.benchmark_limit = cfg.model.cudnn_benchmark_limit
    if ranks.rank:  # the same initial weights everywhere, but each rank its own dropout draws
        torch.manual_seed(torch_seed(cfg.seed, ranks.rank))
    o = cfg.optim
    global_batch = cfg.loader.batch_size * ranks.world_size
    scale = lr_factor(o, ranks.world_size)
    lr = o.lr * scale
    if lr > FLOAT32_MAX:  # the optimizer holds it as float32
        raise ServiceError(EXIT_CONFIG, f"optim.lr {o.lr:g} x {scale:g} ({o.lr_scaling} rule, {ranks.world_size} "
                           "ranks) is beyond float32's range: lower optim.lr")
    lr_rule = (f"global batch {global_batch} ({cfg.loader.batch_size} x {ranks.world_size} rank(s)), lr {lr:g} "
               f"(optim.lr {o.lr:g} per rank's batch x {scale:g}, the {o.lr_scaling} rule)")
    optimizer = PaperSGD(param_groups(model, o.weight_decay, o.bias_decay), lr=lr, momentum=o.momentum,
                         weight_decay=o.weight_decay)
    schedule = PlateauSchedule(optimizer, patience=o.patience, max_drops=o.max_drops)
    device = model.input_device
    # float16 (CUDA only, see resolve): the scaler keeps small gradients from flushing to zero.
    scaler = torch.amp.GradScaler("cuda") if cfg.model.autocast == "float16" else None
    train = _loader(manifest, "train", lambda: build_train_loader(
        manifest, ranks.rank, ranks.world_size, device, cfg.loader, ids=cfg.debug.ids, exclude=exclude,
        stats=stats)) \
        if loaders else None
    val = _loader(manifest, "val", lambda: build_eval_loader(
        manifest, ranks.rank, ranks.world_size, device, cfg.loader, views=cfg.eval_views, exclude=exclude,
        stats=stats)) \
        if loaders else None
    trainable = ranks.wrap(model, device, compiled=cfg.model.compile != "off")
    return Parts(cfg, device, devices, model, trainable, optimizer, schedule, scaler, train, val,
                 manifest.num_classes, lr_rule, scale, shard_check)


def _loader(manifest: Manifest, split: str, make):
    """Build a loader; a failure while DALI opens the shards is a data error naming the shard, a
    file of the shard directory the loader reads first (the statistics) one naming that file."""
    try:
        return make()
    except ManifestError as exc:
        raise DataError(str(exc)) from None
    except (RuntimeError, OSError) as exc:
        raise diagnose(exc, manifest, split) from None
