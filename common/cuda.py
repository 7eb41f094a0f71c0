"""How a host thread waits for the GPU: CUDA's scheduling flag of a device's primary context.

When the host waits for the GPU (an event or stream synchronisation: DALI's hand-over, a log
interval's sync, ``.item()``), CUDA either spins on a core, yields it between polls, or blocks
the thread until an interrupt wakes it.  CUDA's default ("auto") spins whenever the machine has
more cores than active contexts, which is always the case here: the training thread then holds a
core at 100% while it waits, next to DALI's decode threads.  Blocking frees the core but wakes up
later (microseconds).  Which is faster end to end is a measurement (``make gpu-check``'s sweep).

PyTorch has no setting for it, so this sets the flag through the driver API
(``cuDevicePrimaryCtxSetFlags``) on the primary context that PyTorch and DALI both use.  It must
run before anything creates that context (the first tensor on the device), and it applies to the
whole process.
"""
from __future__ import annotations

import ctypes
from typing import Literal

CudaSync = Literal["auto", "spin", "yield", "blocking"]
FLAGS = {"auto": 0, "spin": 1, "yield": 2, "blocking": 4}  # CU_CTX_SCHED_AUTO/SPIN/YIELD/BLOCKING_SYNC
SCHED_MASK = 0x7


def _driver() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise RuntimeError(f"the CUDA driver library (libcuda.so.1) cannot be loaded: {exc}") from None
    _check(lib.cuInit(0), "cuInit")
    return lib


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"{call} failed with CUDA driver error {status}")


def _device(lib: ctypes.CDLL, index: int) -> ctypes.c_int:
    device = ctypes.c_int()
    _check(lib.cuDeviceGet(ctypes.byref(device), index), f"cuDeviceGet({index})")
    return device


def set_sync(mode: CudaSync, index: int = 0) -> None:
    """Make host waits on CUDA device ``index`` spin, yield or block ("auto": CUDA's default)."""
    lib = _driver()
    _check(lib.cuDevicePrimaryCtxSetFlags_v2(_device(lib, index), FLAGS[mode]), "cuDevicePrimaryCtxSetFlags")


def current_sync(index: int = 0) -> tuple[str, bool]:
    """(the scheduling mode of device ``index``'s primary context, whether that context is active)."""
    lib = _driver()
    flags, active = ctypes.c_uint(), ctypes.c_int()
    _check(lib.cuDevicePrimaryCtxGetState(_device(lib, index), ctypes.byref(flags), ctypes.byref(active)),
           "cuDevicePrimaryCtxGetState")
    mode = {v: k for k, v in FLAGS.items()}.get(flags.value & SCHED_MASK, f"flags {flags.value:#x}")
    return mode, bool(active.value)
