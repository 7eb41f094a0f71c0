"""Issue 13's GPU paths (marked ``gpu``; skipped without CUDA, run by ``make gpu-check``): the
stream hand-over does not wait for the training stream, blocking CUDA syncs reach the context
PyTorch and DALI share, and the compiled step with CUDA graphs compiles once and trains like the
eager step."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import LoaderConfig, build_train_loader
from tests.cuda_sleep import sleep_cycles

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[1]
CFG = LoaderConfig(batch_size=16, threads=4, shuffle_buffer=64)


@pytest.mark.parametrize("handover", ["stream", "host"])
def test_next_returns_while_the_training_stream_is_busy(sample_shards: Path, handover: str) -> None:
    """A 2-second kernel queued on the training stream: ``next(loader)`` returns long before it
    ends (the batch's normalising kernels wait on the GPU, not the host), and once the GPU has
    caught up the batch is the one a synchronising loader delivers.  Both hand-overs: DALI's
    streams are non-blocking, so neither waits for the training stream's queue; what ``host``
    adds is a wait for DALI's own unfinished work on the batch, which only a busy run shows
    (the sweep's end-to-end configurations measure it)."""
    ahead = iter(build_train_loader(sample_shards, device="cuda:0", config=CFG.replace(handover=handover)))
    synced = iter(build_train_loader(sample_shards, device="cuda:0", config=CFG.replace(handover="host")))
    next(ahead), next(synced)  # pipeline start, first allocations
    torch.cuda.synchronize()
    cycles = sleep_cycles(2.0)
    torch.cuda._sleep(cycles)
    busy = torch.cuda.Event()
    busy.record()
    start = time.perf_counter()
    images, labels = next(ahead)
    took = time.perf_counter() - start
    assert not busy.query(), "the 2-second kernel ended before next() returned: the test proves nothing"
    assert took < 0.5, f"next() took {took:.2f} s with the training stream busy"
    expected_images, expected_labels = next(synced)
    torch.cuda.synchronize()
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_blocking_sync_reaches_the_shared_context() -> None:
    """Set before anything creates the context (a fresh process), the flag is the one the context
    PyTorch then creates (and DALI uses) runs with."""
    code = ("from common.cuda import set_sync, current_sync; set_sync('blocking'); import torch; "
            "torch.zeros(1, device='cuda'); torch.cuda.synchronize(); print(current_sync(0))")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": path})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "('blocking', True)"


def test_a_driver_error_is_named_by_the_driver() -> None:
    """A device ordinal past the last GPU: the line named CUDA's status as a bare number ("CUDA
    driver error 101"); the driver's own name and text for it now."""
    from common.cuda import set_sync

    with pytest.raises(RuntimeError, match=rf"^cuDeviceGet\({torch.cuda.device_count()}\) failed: "
                                           r"CUDA_ERROR_INVALID_DEVICE \(101: invalid device ordinal\)$"):
        set_sync("blocking", torch.cuda.device_count())


@pytest.fixture(scope="module")
def compiled_run() -> SimpleNamespace:
    """``mode="reduce-overhead"`` on the GPU (bf16, channels_last), compiled once for the module and
    driven beside the eager step through full, short and empty batches, an lr drop and an
    evaluation between steps (its own compiled function, as the service runs it every epoch).
    Each step starts both from the compiled step's weights and velocity, so each comparison is
    of one step.  Losses are read after later replays (each step's loss is a copy, not the
    graph's reused output)."""
    from torch._dynamo.utils import counters

    from model import evaluate, load_velocity_state, velocity_state
    from model.step import CompiledEval, CompiledStep

    (model, opt), (eager, eager_opt) = _replica(), _replica()
    kw = dict(autocast_dtype=torch.bfloat16, channels_last=True)
    step = CompiledStep(model, opt, 64, mode="reduce-overhead", **kw)
    evaluator = CompiledEval(model, 20, mode="reduce-overhead")
    reference = CompiledStep(eager, eager_opt, 64, compile=False, **kw)
    torch._dynamo.reset()
    counters.clear()
    run = SimpleNamespace(step=step, opt=opt, losses=[], expected=[], velocity_off=[])
    for i, n in enumerate((64, 64, 64, 64, 17, 0, 64)):
        with torch.no_grad():
            for a, b in zip(eager.parameters(), model.parameters()):
                a.copy_(b)
        load_velocity_state(eager, eager_opt, velocity_state(model, opt))
        if i == 3:
            _scale_lr((opt, eager_opt), 0.1)
        x, y = _batch(n, seed=i)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            run.losses.append(step(x, y))
            if i in (2, 4, 5):  # the first evaluation compiles its own function, the second reuses it (a
                # short batch, padded), the third has no images (nothing to run: said, not compiled)
                views = x[:2, None].expand(2, 10, 3, 224, 224) if n else x.new_zeros(0, 10, 3, 224, 224)
                result = evaluate(evaluator, [(views, y[:2])], autocast_dtype=torch.bfloat16, channels_last=True)
                assert result.images == min(n, 2)
        run.expected.append(reference(x, y))
        va, vb = velocity_state(model, opt), velocity_state(eager, eager_opt)
        run.velocity_off += [(i, name) for name in va
                             if (va[name] - vb[name]).float().norm() > 0.05 * vb[name].float().norm()]
    run.unique_graphs = counters["stats"]["unique_graphs"]
    run.cudagraph_skips = counters["inductor"]["cudagraph_skips"]
    return run


def _replica() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from model import AlexNet, PaperSGD
    from model.optim import param_groups

    torch.manual_seed(0)
    m = AlexNet(num_classes=1000, bias_init=0.1, dropout=0.0).to("cuda").to(memory_format=torch.channels_last)
    return m, PaperSGD(param_groups(m, 5e-4), lr=0.01)


def _scale_lr(optimizers: tuple[torch.optim.Optimizer, ...], factor: float) -> None:
    for o in optimizers:
        for group in o.param_groups:
            group["lr"] *= factor


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = 50 * torch.randn(n, 3, 224, 224, device="cuda", generator=gen)
    return x, torch.randint(0, 1000, (n,), device="cuda", generator=gen)


def test_the_compiled_step_trains_like_the_eager_step(compiled_run: SimpleNamespace) -> None:
    """The same losses and velocity updates as the eager step, up to bf16, at every step."""
    torch.testing.assert_close(torch.stack(compiled_run.losses), torch.stack(compiled_run.expected), rtol=2e-2, atol=1e-3)
    assert not compiled_run.velocity_off, "(step, parameter) whose update is off by more than 5%"


def test_the_compiled_step_compiles_once_and_runs_as_cuda_graphs(compiled_run: SimpleNamespace) -> None:
    """One compilation for every batch size, the lr drop and the evaluation (recompiling raised in
    the fixture); the step's graphs (one with backward() traced, else two and a break) and the
    evaluation's; and CUDA graphs actually used: Inductor skips them with a log line alone, e.g.
    for a mutated input that is not a static address."""
    from model.step import BACKWARD_IN_GRAPH

    assert compiled_run.unique_graphs == (1 if BACKWARD_IN_GRAPH else 2) + 1
    assert not compiled_run.cudagraph_skips, "Inductor ran a graph without CUDA graphs (see its log)"


def test_a_replayed_compiled_step_never_waits_on_the_gpu(compiled_run: SimpleNamespace) -> None:
    """Replayed, the step never makes the host wait for the GPU: a full batch, an lr drop (a fill
    of the lr tensors), a short batch (the padding)."""
    x, y = _batch(64, seed=99)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        compiled_run.step(x, y)
        _scale_lr((compiled_run.opt,), 0.1)
        compiled_run.step(x[:17], y[:17])
    finally:
        torch.cuda.set_sync_debug_mode(0)
