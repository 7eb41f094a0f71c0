"""``bench.profile_summary`` on a hand-made trace of a GPU step (the arithmetic), and on a real
``torch.profiler`` trace of CPU work (the format)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.profile_summary import summarize, window_profiler


def event(cat: str, name: str, ts: float, dur: float, tid: object = 1, **args) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def test_sync_time_idle_training_stream_and_top_kernels() -> None:
    """A 10 ms window: the training thread (the one running the ops) blocks 3 ms in an event
    sync, a DALI thread 1 ms; the training stream (7) is busy 0-2, 1-4 (overlapping) and 6-9 ms,
    so it idles 3 ms; DALI's stream 20 runs a short kernel."""
    trace = {"traceEvents": [
        event("cpu_op", "aten::mm", 0, 500), event("cpu_op", "aten::add", 600, 100),
        event("cpu_op", "aten::mm", 700, 100, tid=2),
        event("cuda_runtime", "cudaEventSynchronize", 1000, 3000),
        event("cuda_runtime", "cudaStreamSynchronize", 5000, 1000, tid=2),
        event("cuda_runtime", "cudaLaunchKernel", 100, 10),
        event("kernel", "conv", 0, 2000, tid=7, stream=7, device=0),
        event("kernel", "lrn", 1000, 3000, tid=7, stream=7, device=0),
        event("gpu_memcpy", "Memcpy HtoD", 6000, 3000, tid=7, stream=7, device=0),
        event("kernel", "nvjpeg", 4000, 500, tid=20, stream=20, device=0),
        event("cpu_op", "aten::empty", 9900, 100),
        event("user_annotation", "window_end", 9000, 1000), event("cuda_runtime", "cudaDeviceSynchronize", 9100, 800),
        {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "python"}},
    ]}
    s = summarize(trace, steps=2, top=2)
    assert s["window_ms"] == 10.0 and s["steps"] == 2 and s["cuda_trace"] is None
    # the closing sync (inside window_end) is the GPU draining the window, not the loop waiting
    assert s["host_blocked_in_cuda_sync"] == {"training_thread_ms": 3.0, "other_threads_ms": 1.0,
                                              "calls_on_training_thread": {"cudaEventSynchronize": 1},
                                              "drain_ms": 0.8}
    named = summarize(trace, steps=2, main=2)["host_blocked_in_cuda_sync"]  # told, not guessed
    assert (named["training_thread_ms"], named["other_threads_ms"], named["drain_ms"]) == (1.0, 3.8, 0.0)
    assert s["stream_busy_ms"] == {"device 0 stream 7": 7.0, "device 0 stream 20": 0.5}
    assert s["training_stream"] == "device 0 stream 7"
    assert s["gpu_idle_ms_on_training_stream"] == 3.0 and s["gpu_idle_share_on_training_stream"] == 0.3
    assert [k["name"] for k in s["top_kernels"]] == ["lrn", "conv"] and s["top_kernels"][0]["share"] == 0.5455


@pytest.mark.filterwarnings("error")  # torch 2.11 warned on every window before window_profiler set acc_events
def test_a_real_cpu_trace(tmp_path: Path) -> None:
    x = torch.randn(64, 64)
    with window_profiler(cuda=False) as prof:
        for _ in range(3):
            (x @ x).relu()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    s = summarize(json.loads(path.read_text()), steps=3)
    assert s["window_ms"] > 0 and s["training_stream"] is None and s["top_kernels"] == []
    assert s["host_blocked_in_cuda_sync"]["training_thread_ms"] == 0
    # profiled with CUDA, but no CUDA API call in the trace: the tracer did not run, so the sync
    # times are unknown, not zero
    blind = summarize(json.loads(path.read_text()), steps=3, cuda=True)
    assert blind["cuda_trace"] is False and blind["host_blocked_in_cuda_sync"] is None
