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
# CUresult codes (cuda.h) that cuInit, cuDeviceGet and the primary-context calls return in practice,
# for when the driver cannot name one itself: its cuGetErrorName fails too (a stub or broken libcuda).
DRIVER_ERRORS = {
    1: ("CUDA_ERROR_INVALID_VALUE", "an argument out of range"),
    2: ("CUDA_ERROR_OUT_OF_MEMORY", "out of memory or other resources"),
    3: ("CUDA_ERROR_NOT_INITIALIZED", "the driver is not initialised, or its initialisation failed"),
    4: ("CUDA_ERROR_DEINITIALIZED", "the driver is shutting down"),
    34: ("CUDA_ERROR_STUB_LIBRARY", "libcuda.so.1 is the toolkit's stub, not a driver"),
    46: ("CUDA_ERROR_DEVICE_UNAVAILABLE", "the device is busy or unavailable (its compute mode: exclusive or prohibited)"),
    100: ("CUDA_ERROR_NO_DEVICE", "the driver finds no CUDA device"),
    101: ("CUDA_ERROR_INVALID_DEVICE", "no such device, or not for this action"),
    304: ("CUDA_ERROR_OPERATING_SYSTEM", "an OS call failed"),
    708: ("CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE", "the primary context is already initialised"),
    801: ("CUDA_ERROR_NOT_SUPPORTED", "not supported on this system or device"),
    802: ("CUDA_ERROR_SYSTEM_NOT_READY", "a driver daemon is not running (the fabric manager, on NVSwitch machines)"),
    803: ("CUDA_ERROR_SYSTEM_DRIVER_MISMATCH", "the display driver and the CUDA driver are different versions"),
    804: ("CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE", "forward compatibility is not supported on this GPU"),
    999: ("CUDA_ERROR_UNKNOWN", "an unknown internal error"),
}


def _driver() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise RuntimeError(f"the CUDA driver library (libcuda.so.1) cannot be loaded: {exc}") from None
    _check(lib.cuInit(0), "cuInit", lib)
    return lib


def _driver_name(lib: ctypes.CDLL, status: int) -> tuple[str, str] | None:
    """The driver's own (name, text) of ``status`` (``cuGetErrorName``/``cuGetErrorString``), or
    None where it cannot give them."""
    name, text = ctypes.c_char_p(), ctypes.c_char_p()
    try:
        if lib.cuGetErrorName(status, ctypes.byref(name)) or lib.cuGetErrorString(status, ctypes.byref(text)):
            return None
    except AttributeError:  # a libcuda without them (older than CUDA 6)
        return None
    if not name.value or not text.value:
        return None
    return name.value.decode(errors="replace"), text.value.decode(errors="replace")


def status_text(status: int, lib: ctypes.CDLL | None = None) -> str:
    """``CUDA_ERROR_INVALID_DEVICE (101: invalid device ordinal)`` for a CUresult: the driver's
    name and text where ``lib`` gives them, else ``DRIVER_ERRORS``'.  Why: the line said "CUDA
    driver error 101", a number to look up in cuda.h."""
    named = (_driver_name(lib, status) if lib is not None else None) or DRIVER_ERRORS.get(status)
    if named is None:
        return f"CUDA driver error {status} (not among common.cuda's names: see CUresult in cuda.h)"
    return f"{named[0]} ({status}: {named[1]})"


def _check(status: int, call: str, lib: ctypes.CDLL | None = None) -> None:
    if status != 0:
        raise RuntimeError(f"{call} failed: {status_text(status, lib)}")


def _device(lib: ctypes.CDLL, index: int) -> ctypes.c_int:
    device = ctypes.c_int()
    _check(lib.cuDeviceGet(ctypes.byref(device), index), f"cuDeviceGet({index})", lib)
    return device


def set_sync(mode: CudaSync, index: int = 0) -> None:
    """Make host waits on CUDA device ``index`` spin, yield or block ("auto": CUDA's default)."""
    lib = _driver()
    _check(lib.cuDevicePrimaryCtxSetFlags_v2(_device(lib, index), FLAGS[mode]), "cuDevicePrimaryCtxSetFlags", lib)


def current_sync(index: int = 0) -> tuple[str, bool]:
    """(the scheduling mode of device ``index``'s primary context, whether that context is active)."""
    lib = _driver()
    flags, active = ctypes.c_uint(), ctypes.c_int()
    _check(lib.cuDevicePrimaryCtxGetState(_device(lib, index), ctypes.byref(flags), ctypes.byref(active)),
           "cuDevicePrimaryCtxGetState", lib)
    mode = {v: k for k, v in FLAGS.items()}.get(flags.value & SCHED_MASK, f"flags {flags.value:#x}")
    return mode, bool(active.value)
