"""What one profiled window of training says, from ``torch.profiler``'s Chrome trace: how long the
host was blocked in CUDA synchronisations (per thread: the training thread vs DALI's), how long
the GPU idled on the training stream, and which kernels took the time.

The three questions of issue 13's profile: a data wait that is really GPU backlog shows as the
training thread blocked in ``cudaEventSynchronize`` (DALI's host hand-over) while the training
stream is busy; a host that cannot keep up shows as idle gaps on the training stream; and the
kernel table says where a model-bound step goes.
"""
from __future__ import annotations

from collections import Counter, defaultdict

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
API_CATEGORIES = ("cuda_runtime", "cuda_driver")
# The ``record_function`` the caller wraps its window's closing synchronisation in: that wait is the
# GPU finishing what the window queued, not a wait of the training loop (``drain_ms``).
WINDOW_END = "window_end"


def window_profiler(cuda: bool):
    """``torch.profiler.profile`` for one window (CPU, plus CUDA when ``cuda``). ``acc_events`` only
    keeps events across profiling cycles, and a window is one cycle: it is set because torch 2.11
    (the GPU machines' version) warns on every window that a next cycle would clear this one's."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []), acc_events=True)


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _main_thread(events: list[dict]) -> object:
    """The thread that ran the most PyTorch operators: the training loop's."""
    ops = Counter(e["tid"] for e in events if e.get("cat") == "cpu_op")
    return ops.most_common(1)[0][0] if ops else None


def _syncs(events: list[dict], main: object) -> dict:
    calls = [e for e in events if e.get("cat") in API_CATEGORIES and "Synchronize" in e.get("name", "")]
    ends = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == WINDOW_END and e["tid"] == main]
    drain = [e for e in calls if e["tid"] == main and any(a <= e["ts"] <= b for a, b in ends)]
    on_main = [e for e in calls if e["tid"] == main and e not in drain]
    return {"training_thread_ms": round(sum(e["dur"] for e in on_main) / 1e3, 3),
            "other_threads_ms": round(sum(e["dur"] for e in calls if e["tid"] != main) / 1e3, 3),
            "calls_on_training_thread": dict(Counter(e["name"] for e in on_main)),
            "drain_ms": round(sum(e["dur"] for e in drain) / 1e3, 3)}


def _streams(gpu: list[dict]) -> dict[str, float]:
    """Busy milliseconds of every (device, stream) that ran kernels or copies."""
    intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in gpu:
        args = e.get("args", {})
        key = f"device {args.get('device', e.get('pid'))} stream {args.get('stream', e.get('tid'))}"
        intervals[key].append((e["ts"], e["ts"] + e["dur"]))
    return {k: round(_busy(v) / 1e3, 3) for k, v in intervals.items()}


def summarize(trace: dict, steps: int, top: int = 10, main: object = None, cuda: bool = False) -> dict:
    """The summary of a Chrome trace (``prof.export_chrome_trace``) of ``steps`` training steps.
    ``main``: the training thread's id (``threading.get_native_id()``, what the trace records);
    None guesses it (the thread with the most operators; on a GPU autograd's own thread may run
    more).  ``cuda``: the window was profiled with CUDA activities; a trace without a single CUDA
    API call then means the CUDA tracer (CUPTI) did not run, and the sync times are unknown
    (None, ``cuda_trace`` false), not zero."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    if not events:
        raise ValueError("the trace has no timed events")
    start = min(e["ts"] for e in events)
    window_ms = (max(e["ts"] + e["dur"] for e in events) - start) / 1e3
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    busy = _streams(gpu)
    traced = not cuda or any(e.get("cat") in API_CATEGORIES for e in events)
    summary = {"steps": steps, "window_ms": round(window_ms, 3), "cuda_trace": traced if cuda else None,
               "host_blocked_in_cuda_sync": _syncs(events, _main_thread(events) if main is None else main)
               if traced else None,
               "stream_busy_ms": busy, "training_stream": None, "gpu_idle_ms_on_training_stream": None,
               "gpu_idle_share_on_training_stream": None, "top_kernels": []}
    if busy:
        stream = max(busy, key=busy.get)  # the training step's kernels dominate the GPU time
        idle = max(window_ms - busy[stream], 0.0)
        summary.update(training_stream=stream, gpu_idle_ms_on_training_stream=round(idle, 3),
                       gpu_idle_share_on_training_stream=round(idle / window_ms, 4))
    kernels: dict[str, list[float]] = defaultdict(list)
    for e in gpu:
        if e["cat"] == "kernel":
            kernels[e["name"]].append(e["dur"])
    total = sum(sum(v) for v in kernels.values()) or 1.0
    ranked = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:top]
    summary["top_kernels"] = [{"name": name[:120], "total_ms": round(sum(d) / 1e3, 3), "calls": len(d),
                               "share": round(sum(d) / total, 4)} for name, d in ranked]
    return summary
