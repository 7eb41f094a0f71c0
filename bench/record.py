"""The header every benchmark record starts with, in one place: which benchmark, when, on what
(CPU, usable cores, platform, Python, torch, numpy and the other libraries the benchmark uses,
the git commit, the GPUs), and the machine's 1-minute load average before and after the run
(other jobs on the machine make the numbers noisy, so the record says how busy it was).

    record = header("model train_step throughput", "pillow")   # before the timed work
    ...                                                          # add the benchmark's own fields
    finish(record)                                               # the load after, just before writing
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The name a record gives a library -> the module whose __version__ it reports (Pillow-SIMD's
# distribution is not "Pillow", so the module is asked, not the package metadata).
LIBRARIES = {"torch": "torch", "numpy": "numpy", "dali": "nvidia.dali", "pillow": "PIL", "webdataset": "webdataset"}


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def pillow_name() -> str:
    """``"Pillow-SIMD"`` or ``"Pillow"``: the distribution whose ``PIL`` is imported.  Both install
    the same package, and PIL's version alone does not tell them apart; Pillow-SIMD's metadata
    carrying the imported version does (as tests/test_environment.py checks the project's own).
    A plain Pillow earlier on the path (the GPU machines' Pillow 12.3.0) was reported as SIMD."""
    import PIL

    try:
        return "Pillow-SIMD" if md.version("Pillow-SIMD") == PIL.__version__ else "Pillow"
    except md.PackageNotFoundError:
        return "Pillow"


def git_commit() -> str:
    """The short commit of the checkout, with "-dirty" when its tree has changes ("" outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("-dirty" if commit and git("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(*libraries: str) -> dict:
    """The machine, the card(s) and the versions the numbers belong to: torch and numpy always,
    and each of ``libraries`` (keys of LIBRARIES) the benchmark uses."""
    import torch

    info = {"cpu": _cpu(), "cpu_cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": sys.version.split()[0]}
    for name in ("torch", "numpy", *libraries):
        info[name] = importlib.import_module(LIBRARIES[name]).__version__
    if "pillow" in libraries:
        info["pillow_distribution"] = pillow_name()
    info["git_commit"] = git_commit()
    info["gpus"] = []
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        # "fp32" on the GPU means PyTorch's defaults: cuDNN convolutions may use TF32.
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return info


def header(benchmark: str, *libraries: str) -> dict:
    """A record's first fields; call it before the timed work (it takes the load "before")."""
    return {"benchmark": benchmark, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(*libraries),
            "load_average_1min": {"before": os.getloadavg()[0]}}


def finish(record: dict) -> dict:
    """Adds the load "after" to a record made by ``header``; call it when the timed work is done."""
    record["load_average_1min"]["after"] = os.getloadavg()[0]
    return record


def where(record: dict, on_gpu: bool = True) -> str:
    """What a chart's title says the numbers ran on: the GPUs when they were used, else the CPU
    and its cores."""
    info = record["machine"]
    return (on_gpu and ", ".join(info["gpus"])) or f"{info['cpu']} ({info['cpu_cores']} cores)"
