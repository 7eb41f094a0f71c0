"""A GPU kernel that keeps a stream busy for a chosen time (the GPU tests' stand-in for a
training step's backlog)."""
from __future__ import annotations

import torch


def sleep_cycles(seconds: float) -> int:
    """GPU clock cycles that ``torch.cuda._sleep`` spins for about ``seconds``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    end.synchronize()
    return int(50_000_000 * seconds / (start.elapsed_time(end) / 1e3))
