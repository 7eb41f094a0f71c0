"""A process that ends with its parent: the kernel's parent-death signal (Linux
``prctl(PR_SET_PDEATHSIG)``), for the two places a child must not outlive what started it: the
benchmark children of ``make gpu-check`` (``bench.child``) and the ranks of a torchrun job
(``service.signals.follow_launcher``).

The signal comes when the thread that started the process ends; the library is looked up here,
at import in the parent: a child forked from a process with CUDA's threads running should only
make the call between fork and exec (a dlopen there could deadlock on a lock one of those threads
held).
"""
from __future__ import annotations

import ctypes
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
AVAILABLE = _PRCTL is not None


def ask_for_signal(signum: int) -> bool:
    """Have the kernel send ``signum`` to this process when its parent ends; whether it agreed
    (False off Linux, or where a kernel or sandbox refuses)."""
    return _PRCTL is not None and _PRCTL(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
