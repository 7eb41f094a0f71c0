"""The GPU paths (marked ``gpu``; skipped without CUDA, run by ``make gpu-check``): no host-GPU
synchronisation in the training loop, the GPU normaliser against the CPU one, and nvJPEG decode
against the CPU decode the dataset statistics came from."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import LoaderConfig, build_eval_loader, build_train_loader
from pipeline.normalize import DeviceNormalizer
from pipeline.stats import load_stats
from shards.manifest import load
from tests.cuda_sleep import sleep_cycles

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CFG = LoaderConfig(batch_size=16, threads=4, shuffle_buffer=64)


@pytest.mark.parametrize("handover", ["host", "stream"])
def test_loader_and_train_step_never_synchronise(sample_shards: Path, handover: str) -> None:
    """A loader step and a bf16 training step under ``set_sync_debug_mode("error")``: any call
    that makes the host wait for the GPU (a pageable copy, ``.item()``...) raises."""
    from model import AlexNet, PaperSGD, prepare_model, train_step

    cuda = torch.device("cuda:0")
    loader = build_train_loader(sample_shards, device=cuda, config=CFG.replace(handover=handover))
    model = prepare_model(AlexNet(num_classes=6, bias_init=0.1).to(cuda), channels_last=True)
    opt = PaperSGD(model.parameters())
    batches = iter(loader)

    def step() -> torch.Tensor:
        images, labels = next(batches)
        assert images.is_cuda and labels.is_cuda
        return train_step(model, opt, images, labels, autocast_dtype=torch.bfloat16, channels_last=True)

    step()  # first batch: pipeline start, cuDNN choices, allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = sum(step() for _ in range(3))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(total)


@pytest.mark.parametrize("mode,dtype,memory_format", [
    ("mean_image", "float32", "contiguous"), ("channel", "float32", "contiguous"),
    ("mean_image", "bfloat16", "channels_last"), ("mean_image", "float32", "channels_last")])
def test_gpu_normaliser_matches_cpu(sample_shards: Path, mode: str, dtype: str, memory_format: str) -> None:
    """The same uint8 crops and draws through the batched GPU path and the per-sample CPU path:
    bit-identical in the paper's mean-image mode, in each output dtype and layout (both round
    once, from float32); the channel mode's fused multiply-add may round differently on the GPU,
    within 1e-4."""
    stats = load_stats(load(sample_shards).stats_path)
    cfg = LoaderConfig(normalize=mode, dtype=dtype, memory_format=memory_format)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 224, 224, 3), dtype=torch.uint8, generator=gen)
    anchors, mirror = torch.randint(0, 33, (8, 2), generator=gen), torch.randint(0, 2, (8,), generator=gen)
    alpha = 0.1 * torch.randn(8, 3, generator=gen)
    cpu = DeviceNormalizer(stats, cfg)(images, anchors, mirror, alpha)
    gpu = DeviceNormalizer(stats, cfg).to("cuda")(images, anchors, mirror, alpha)
    layout = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    assert gpu.dtype == cpu.dtype == getattr(torch, dtype) and gpu.is_contiguous(memory_format=layout)
    gpu = gpu.cpu()
    if mode == "mean_image":
        assert torch.equal(cpu, gpu)
    else:
        torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=0)


def _centre_crops(shards: Path, device: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 centre crops of the val split (in id order) and their ids."""
    loader = build_eval_loader(shards, device=device, config=CFG, views=1, ids=True)
    crops, ids = [], []
    for raw in loader.raw_batches():
        crops.append(raw.images.cpu().numpy())
        ids.append(raw.ids.numpy())
    order = np.argsort(np.concatenate(ids))
    return np.concatenate(crops)[order], np.concatenate(ids)[order]


def test_mixed_decode_matches_the_cpu_decode(sample_shards: Path) -> None:
    """nvJPEG with ``jpeg_fancy_upsampling`` against libjpeg-turbo (the decoder the mean image
    and the PCA came from): IDCT rounding differences only, no chroma-upsampling offsets."""
    cpu, cpu_ids = _centre_crops(sample_shards, "cpu")
    gpu, gpu_ids = _centre_crops(sample_shards, "cuda:0")
    assert np.array_equal(cpu_ids, gpu_ids)
    diff = np.abs(cpu.astype(np.int16) - gpu.astype(np.int16))
    print(f"mixed vs CPU decode: mean abs {diff.mean():.3f} levels, max {diff.max()}, "
          f"share of pixels off by more than 2: {(diff > 2).mean():.4f}")
    assert diff.mean() < 1.0 and (diff > 8).mean() < 0.001


@pytest.mark.parametrize("handover", ["host", "stream"])
def test_batches_survive_the_host_running_ahead(sample_shards: Path, handover: str) -> None:
    """DALI hands out its own GPU buffers (no copy) and may reuse them once released; the loader
    holds each batch until the GPU has run the kernels that read it.  The same seeded epoch read
    twice, once with the training stream 20 ms behind the host at every batch (a kernel queued
    before each batch is taken, no sync until the end: the batch's reads run long after the host
    moved on) and once synchronising after every batch, must give identical images and labels."""
    lag = sleep_cycles(0.02)

    def epoch(sync_each: bool) -> list[torch.Tensor]:
        loader = build_train_loader(sample_shards, device="cuda:0", config=CFG.replace(handover=handover))
        out = []
        batches = iter(loader)
        while True:
            if not sync_each:
                torch.cuda._sleep(lag)
            try:
                images, labels = next(batches)
            except StopIteration:
                break
            out.append(torch.cat([images.flatten(1), labels[:, None].float()], dim=1) * 1.0)
            if sync_each:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        return [t.cpu() for t in out]

    ahead, synced = epoch(False), epoch(True)
    assert len(ahead) == len(synced) > 1
    assert all(torch.equal(a, b) for a, b in zip(ahead, synced))


def test_a_batch_is_held_when_its_consumer_stops_mid_epoch(sample_shards: Path) -> None:
    """A consumer that leaves the epoch (``break``, an exception, ``close()``) after queueing its
    reads of a batch: the batch is held like any other until those reads have run, not freed
    with the generator while they wait behind the training stream's queue."""
    loader = build_train_loader(sample_shards, device="cuda:0", config=CFG.replace(handover="stream"))
    for images, _ in loader:
        torch.cuda._sleep(sleep_cycles(1.0))
        read = images * 1.0  # queued behind the 1-second kernel
        break
    held = loader._keepalive._held
    assert held and not held[-1][0].query(), "the batch was let go while a queued kernel still reads it"
    torch.cuda.synchronize()
    assert torch.isfinite(read).all()
