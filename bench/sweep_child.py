"""One configuration of the sweep (``bench.sweep``), in its own process:

    python -m bench.sweep_child SPEC_JSON RESULT_JSON

SPEC: ``name``, ``kind`` ("model", "pipeline" or "train"), ``flags`` (the service's own
``--section.key value`` settings), ``shards``, ``warmup``/``steps`` (batches), ``eval_batches``,
``eval_warmup``, ``profile_steps`` and ``trace`` (train only).  Everything is built by the service's own code
(``service.build``), so a configuration measured here is the one ``python -m service`` runs with
the same flags.

* model: the training step alone on one synthetic batch already on the device (in the loader's
  dtype and layout), and the 10-view evaluation forward (views per second);
* pipeline: the training loader alone, normalised batches on the device, no training;
* train: the loader feeding the step, with the data wait measured as the service does
  (``service.metric_logger.StepTimer``), then the same step alone on one of those batches (the
  issue's "model alone of the same configuration"), then optionally a ``torch.profiler`` window.
"""
from __future__ import annotations

import gzip
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from bench.child import write_json
from model import evaluate
from service.app import parse
from service.build import Parts, apply_cuda_sync, build, resolve
from service.dist import Ranks
from service.metric_logger import StepTimer
from shards.manifest import load


def sync(parts: Parts) -> None:
    for d in parts.devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def endless(loader):
    while True:
        yield from loader


def synthetic(parts: Parts, views: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch shaped and typed like the loader's: (B, 3, 224, 224) or (B, V, 3, 224, 224), in
    memory of its own as the loader's (not a broadcast view, which every call would copy)."""
    cfg = parts.cfg.loader
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.dtype]
    images = 50 * torch.randn(cfg.batch_size, 3, cfg.crop, cfg.crop, device=parts.device)
    if cfg.memory_format == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    images = images.to(dtype)
    if views:
        images = images[:, None].repeat(1, views, 1, 1, 1)
    return images, torch.randint(0, parts.num_classes, (cfg.batch_size,), device=parts.device)


def timed_steps(parts: Parts, batches, warmup: int, steps: int) -> dict:
    """images/s of ``steps`` steps after ``warmup`` (compilation, cuDNN's choices, CUDA graphs)."""
    start = time.perf_counter()
    for _, (x, y) in zip(range(warmup), batches):
        parts.step(x, y)
    sync(parts)
    warm = time.perf_counter() - start
    timer = StepTimer()
    for x, y in (b for _, b in zip(range(steps), timer.iterate(batches, lambda b: len(b[1])))):
        loss = parts.step(x, y)
    window = timer.window(lambda: sync(parts))
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    return {"images_per_s": round(window.images_per_s, 1), "ms_per_step": round(1e3 * window.seconds / steps, 3),
            "data_wait_share": round(window.data_share, 4), "warmup_seconds": round(warm, 1)}


def eval_rate(parts: Parts, batches: int, warmup: int) -> float:
    """Views per second of the evaluation forward on batches of ``eval_views`` views (evaluate's
    own sync at the end of each call), after ``warmup`` calls: with CUDA graphs a compiled
    function's first call runs eagerly and its second records the graph
    (torch._inductor.cudagraph_trees), so timing starts at the third."""
    views = parts.cfg.eval_views
    images, labels = synthetic(parts, views=views) if views > 1 else synthetic(parts)
    m = parts.cfg.model

    def calls(n: int) -> None:
        evaluate(parts.evaluator, [(images, labels)] * n, autocast_dtype=parts.autocast, channels_last=m.channels_last)

    calls(warmup)
    start = time.perf_counter()
    calls(batches)
    return round(batches * images.shape[0] * views / (time.perf_counter() - start), 1)


def pipeline_rate(parts: Parts, warmup: int, batches: int) -> dict:
    """Normalised training batches per second on the device, and the process's CPU time per image
    (DALI's threads included: the hybrid nvJPEG path spends it, the hardware decoder does not)."""
    stream = endless(parts.train)
    for _, _ in zip(range(warmup), stream):
        pass
    sync(parts)
    start, cpu, images = time.perf_counter(), time.process_time(), 0
    for _, (x, y) in zip(range(batches), stream):
        images += len(y)
    sync(parts)
    seconds = time.perf_counter() - start
    return {"images_per_s": round(images / seconds, 1),
            "cpu_us_per_image": round(1e6 * (time.process_time() - cpu) / images, 1)}


def profiled(parts: Parts, batches, steps: int, trace: Path) -> dict:
    """A ``torch.profiler`` window of ``steps`` loader-fed steps, summarised (bench.profile_summary):
    the closing synchronisation is marked as the window's end (the GPU draining what the window
    queued, not a wait of the loop), and the training thread is named, not guessed."""
    from bench.profile_summary import WINDOW_END, summarize, window_profiler

    cuda = torch.cuda.is_available()
    with window_profiler(cuda=cuda) as prof:
        for _, (x, y) in zip(range(steps), batches):
            parts.step(x, y)
        with torch.profiler.record_function(WINDOW_END):
            sync(parts)
    raw = trace.with_suffix("")
    prof.export_chrome_trace(str(raw))
    data = json.loads(raw.read_text())
    with gzip.open(trace, "wt") as f:  # the whole trace, for Perfetto / chrome://tracing
        json.dump(data, f)
    raw.unlink()
    return summarize(data, steps, main=threading.get_native_id(), cuda=cuda)


def run(spec: dict, save) -> dict:
    """The configuration's measurements; ``save(result)`` writes what there is before a profile
    (the profiler on CUDA graphs has crashed processes: pytorch#75504), so that a profile that
    fails, even natively, costs the profile alone."""
    cfg = resolve(parse(["--shards", spec["shards"], *spec["flags"]]), Ranks())
    apply_cuda_sync(cfg)
    kind, warmup, steps = spec["kind"], spec["warmup"], spec["steps"]
    parts = build(cfg, Ranks(), load(cfg.shards), loaders=kind != "model")  # the step alone: no DALI beside it
    result: dict = {"device": str(parts.device), "batch": cfg.loader.batch_size}
    if kind == "pipeline":
        return {**result, **pipeline_rate(parts, warmup, steps)}
    if kind == "model":
        fixed = synthetic(parts)
        result.update(timed_steps(parts, iter(lambda: fixed, None), warmup, steps))
        if spec.get("eval_batches"):
            result["eval_views_per_s"] = eval_rate(parts, spec["eval_batches"], spec.get("eval_warmup", 1))
    else:
        batches = endless(parts.train)
        result.update(timed_steps(parts, batches, warmup, steps))
        x, y = next(batches)
        fixed = (x.clone(), y.clone())
        alone = timed_steps(parts, iter(lambda: fixed, None), 2, steps)["images_per_s"]
        result.update(model_alone_images_per_s=alone, ratio_to_model_alone=round(result["images_per_s"] / alone, 4))
        if spec.get("profile_steps"):
            save(compiled(result))
            try:
                result["profile"] = profiled(parts, batches, spec["profile_steps"], Path(spec["trace"]))
            except Exception as exc:  # the measurement stands without its profile
                result["profile_error"] = f"{type(exc).__name__}: {exc}"[:500]
    return compiled(result)


def compiled(result: dict) -> dict:
    """``result`` with what was compiled (graphs, breaks) and the GPU memory peak."""
    result = {**result, "graphs": counters["stats"]["unique_graphs"],
              "graph_breaks": sum(counters["graph_break"].values())}
    if torch.cuda.is_available():
        result["max_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main(argv: list[str]) -> int:
    spec, out = json.loads(argv[0]), Path(argv[1])
    start = time.perf_counter()
    record = {"name": spec["name"], "kind": spec["kind"], "flags": spec["flags"], "pid": os.getpid()}

    def save(result: dict) -> dict:
        done = {**record, **result, "seconds": round(time.perf_counter() - start, 1), "status": "ok"}
        write_json(out, done)  # whole: the parent reads it whatever happens after
        return done

    record = save(run(spec, save))
    print(json.dumps(record), flush=True)
    sys.stderr.flush()
    # The result is on disk: skip the teardown of DALI's pipelines and CUDA graph pools, which can
    # hang or crash after the measurement and cost the budget (the parent keeps the result anyway).
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
