"""Host-thread settings: ``loader.affinity spare_core`` keeps DALI's worker threads off the last
usable core (read back from the kernel), and with several ranks on a machine each rank's on its
own share of the cores; ``cuda_sync`` needs the CUDA driver (on a machine without one it says so;
on CPU runs the service never touches it)."""
from __future__ import annotations

import ctypes.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.cuda import set_sync
from pipeline.graph import affinity_mask

ROOT = Path(__file__).resolve().parents[1]

# In a fresh interpreter (DALI_AFFINITY_MASK is read as the pipeline's threads start): the CPUs
# each DALI worker thread may run on, from /proc.
WORKER = r"""
import glob, json, os, sys
from pipeline import LoaderConfig, build_train_loader
config = LoaderConfig(batch_size=8, threads=3, affinity=sys.argv[2])
if len(sys.argv) > 3:  # place argv[3] of argv[4] ranks sharing this machine's cores: the service's share first
    from service.build import share_cores
    from service.config import TrainConfig
    config = share_cores(TrainConfig(loader=config), int(sys.argv[3]), int(sys.argv[4]))[0].loader
loader = build_train_loader(sys.argv[1], config=config)
next(iter(loader))
threads = {}
for task in glob.glob("/proc/self/task/*"):
    name = open(task + "/comm").read().strip()
    if name.startswith("[DALI][TP") or task.endswith(f"/{os.getpid()}"):
        status = open(task + "/status").read().split("Cpus_allowed_list:")[1].split()[0]
        threads["main" if task.endswith(f"/{os.getpid()}") else name] = status
print(json.dumps(threads))
"""


def allowed_cpus(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def dali_worker_cpus(shards: Path, affinity: str, *local: int) -> dict[str, set[int]]:
    """The CPUs of each DALI worker thread and of the main thread ("main"); ``local``: (local
    rank, local ranks) for a service rank among several on this machine."""
    import json

    out = subprocess.run([sys.executable, "-c", WORKER, str(shards), affinity, *map(str, local)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    return {name: allowed_cpus(cpus) for name, cpus in json.loads(out.stdout.splitlines()[-1]).items()}


def test_affinity_mask_gives_every_thread_a_core_but_the_last() -> None:
    assert affinity_mask({0, 1, 2, 3}, 5) == "0,1,2,0,1"
    assert affinity_mask({4, 7}, 3) == "4,4,4"
    assert affinity_mask({3}, 2) == "3,3"  # one core: nothing to spare


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_spare_core_keeps_dali_workers_off_the_last_core(sample_shards: Path) -> None:
    last = max(os.sched_getaffinity(0))
    pinned = dali_worker_cpus(sample_shards, "spare_core")
    main = pinned.pop("main")
    assert len(pinned) == 3 and all(cpus and last not in cpus for cpus in pinned.values())
    assert main == os.sched_getaffinity(0)  # the training thread is not pinned
    free = dali_worker_cpus(sample_shards, "none")
    assert all(last in cpus for cpus in free.values())


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_spare_core_gives_each_rank_of_a_machine_its_own_cores(sample_shards: Path) -> None:
    """Two ranks on one machine, each binding its DALI threads: every rank the same mask would
    put both ranks' threads on the same cores (all but the last) and leave the last idle."""
    ranks = [dali_worker_cpus(sample_shards, "spare_core", local, 2) for local in (0, 1)]
    cores = sorted(os.sched_getaffinity(0))
    shares = [set(cores[:len(cores) // 2]), set(cores[len(cores) // 2:])]
    for share, cpus in zip(shares, ranks):
        assert cpus.pop("main") == share  # the rank runs on its share, its training thread included
        assert len(cpus) == 3 and all(c and c <= share for c in cpus.values()), (share, cpus)
    assert not set().union(*ranks[0].values()) & set().union(*ranks[1].values())
    unpinned = dali_worker_cpus(sample_shards, "none", 1, 2)  # only spare_core binds, the share too
    assert unpinned.pop("main") == set(cores)


@pytest.mark.skipif(ctypes.util.find_library("cuda") is not None, reason="a CUDA driver is installed here")
def test_cuda_sync_without_a_driver_says_so() -> None:
    with pytest.raises(RuntimeError, match="libcuda.so.1"):
        set_sync("blocking")


@pytest.mark.parametrize("status, says", [
    (101, "cuDeviceGet(7) failed: CUDA_ERROR_INVALID_DEVICE (101: no such device, or not for this action)"),
    (802, "cuDeviceGet(7) failed: CUDA_ERROR_SYSTEM_NOT_READY (802: a driver daemon is not running"),
    (12345, "cuDeviceGet(7) failed: CUDA driver error 12345 (not among common.cuda's names: see CUresult in cuda.h)"),
])
def test_a_driver_error_is_named_not_numbered(status: int, says: str) -> None:
    """The line was "cuDeviceGet(7) failed with CUDA driver error 101": a number to look up in
    cuda.h.  The driver names its codes itself (a GPU test checks that); without one, or with a
    stub that cannot, common.cuda's table does."""
    from common.cuda import _check

    with pytest.raises(RuntimeError, match=f"^{re.escape(says)}"):
        _check(status, "cuDeviceGet(7)")


CUDA_H = Path("/usr/local/cuda/include/cuda.h")


@pytest.mark.skipif(not CUDA_H.is_file(), reason="no CUDA toolkit's cuda.h here")
def test_the_driver_error_names_are_cuda_h_s() -> None:
    """Each name common.cuda gives a code is cuda.h's own (CUresult): a wrong one would send the
    reader to another error."""
    from common.cuda import DRIVER_ERRORS

    header = CUDA_H.read_text()
    enum = header[header.index("enum cudaError_enum"):header.index("} CUresult;")]
    codes = {name: int(code) for name, code in re.findall(r"^\s*(CUDA_\w+)\s*=\s*(\d+)", enum, re.M)}
    assert len(codes) > 50
    assert {code: codes.get(name) for code, (name, _) in DRIVER_ERRORS.items()} == {c: c for c in DRIVER_ERRORS}
