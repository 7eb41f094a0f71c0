"""Who this process is among the ranks of a run, and what the ranks do together: the one place
that knows about torchrun and ``torch.distributed``.

torchrun (SPEC 8) starts one process per GPU (or per GPU pair for the towers layout) and tells
each its ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` through the environment.  The rest of the
service asks this module instead of the environment: which device to use, which part of the
data to read (the loader's ``rank``/``world_size``), whether to write checkpoints (rank 0 only),
which HTTP port to serve (base + LOCAL_RANK, so every rank of a node has its own scrape target),
and how to combine per-rank values.

Data parallelism: every rank owns one model replica (one device, or two for the towers layout)
wrapped in ``DistributedDataParallel``, which averages the gradients; the loaders are sharded by
rank.  Gradients travel on the main process group (NCCL on GPUs, gloo on the CPU).  The loop's
small host-side agreements (stop now? checkpoint now?, every rank's loader position and RNG
state for rank 0's checkpoint, the evaluation's counts) go over a second, gloo group on the
CPU, so asking them never waits for the GPU: an NCCL collective on a host value would need a
copy to the device and a synchronisation per step.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

T = TypeVar("T")
_CONTROL: list = []  # the gloo group of the host-side agreements, once ``start`` has run


# How gloo says a rank's process is gone (its TCP pair closed): another rank crashed or stopped.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_gone(exc: BaseException) -> bool:
    """Whether a collective failed because another rank of the job is gone, not of itself."""
    return isinstance(exc, dist.DistNetworkError) or any(words in str(exc) for words in _PEER_GONE)


class RankError(ValueError):
    """The torchrun environment is inconsistent or asks for what this version cannot do."""


def _int_env(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RankError(f"environment variable {key}={value!r} is not an integer") from None


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # the ranks on this machine (torchrun's LOCAL_WORLD_SIZE)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Ranks:
        """Read torchrun's variables (absent = a single process)."""
        env = os.environ if env is None else env
        local_rank = _int_env(env, "LOCAL_RANK", 0)
        ranks = cls(_int_env(env, "RANK", 0), _int_env(env, "WORLD_SIZE", 1), local_rank,
                    _int_env(env, "LOCAL_WORLD_SIZE", local_rank + 1))
        if (ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size
                or not 0 <= ranks.local_rank < ranks.local_world_size):
            raise RankError(f"RANK={ranks.rank} WORLD_SIZE={ranks.world_size} LOCAL_RANK={ranks.local_rank} "
                            f"LOCAL_WORLD_SIZE={ranks.local_world_size} is not a valid torchrun environment")
        return ranks

    def core_peers(self) -> tuple[int, int]:
        """(this rank's place, how many) among the joined ranks on this machine that may run on
        exactly the same cores as this one: those share them.  Ranks a launcher already bound
        to cores of their own (``srun --cpu-bind``, a NUMA binding) have none; ranks started
        side by side (torchrun) on one machine or container share all of its cores."""
        me = (socket.gethostname(), sorted(os.sched_getaffinity(0)))
        peers = [rank for rank, other in enumerate(self.gather(me)) if other == me]
        return peers.index(self.rank), len(peers)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, the history and the curve."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def start(self, device: torch.device) -> None:
        """Join the other ranks (torchrun's ``env://`` rendezvous); nothing for one process."""
        if not self.distributed or _CONTROL:
            return
        store = attempt_store()
        joined = {"store": store, "rank": self.rank, "world_size": self.world_size} if store else {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device, **joined)
            _CONTROL.append(dist.new_group(backend="gloo"))
        else:
            dist.init_process_group("gloo", **joined)
            _CONTROL.append(dist.group.WORLD)

    def close(self) -> None:
        """Leave the process group (after the last collective)."""
        if _CONTROL and dist.is_initialized():
            dist.destroy_process_group()
        _CONTROL.clear()

    def wrap(self, model: torch.nn.Module, device: torch.device, compiled: bool = False) -> torch.nn.Module:
        """The module the training step runs: ``model`` itself for one process, else
        ``replica(model, device, compiled)``."""
        return replica(model, device, compiled) if self.distributed else model

    def barrier(self) -> None:
        """Wait until every rank got here (host side)."""
        if _CONTROL:
            dist.barrier(group=_CONTROL[0])

    def http_port(self, base: int) -> int:
        """Base port + LOCAL_RANK (0 stays 0: any free port).  ``RankError`` when the last rank
        on this machine would get a port past 65535: every rank says so alike, before joining
        (socket's bind raised ``OverflowError``, a traceback, on that rank alone)."""
        last = base + self.local_world_size - 1
        if base and last > 65535:
            raise RankError(f"http.port {base}: each of the {self.local_world_size} ranks on this machine serves on "
                            f"http.port + its LOCAL_RANK, up to {last}, past the last port 65535: choose --http.port "
                            f"{65536 - self.local_world_size} or lower (or 0: any free ports)")
        return base + self.local_rank if base else 0

    def device(self, name: str) -> torch.device:
        """``auto``: this rank's GPU (``cuda:<LOCAL_RANK>``) when there is one, else the CPU."""
        if name == "auto":
            return torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        if name == "cuda":
            return torch.device(f"cuda:{self.local_rank}")
        return torch.device(name)

    def suffix(self) -> str:
        """File-name suffix for per-rank files: empty on rank 0 (``log.jsonl``), ``.rank3`` else."""
        return "" if self.is_main else f".rank{self.rank}"

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (picklable), by rank, on every rank.  One process: ``[value]``."""
        if not _CONTROL:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=_CONTROL[0])
        return out

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` (picklable) on every rank.  One process: ``value``."""
        if not _CONTROL:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=_CONTROL[0])
        return box[0]

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag: True on every rank when it is true on any rank (a stop, a checkpoint
        must be agreed on: every rank takes part in both), in one collective."""
        if not _CONTROL:
            return flags
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL[0])
        return tuple(bool(v) for v in t.tolist())

    def info(self) -> dict[str, Any]:
        """For logs and /status."""
        return {"rank": self.rank, "world_size": self.world_size, "local_rank": self.local_rank}


def attempt_store(env: Mapping[str, str] | None = None, timeout: timedelta = default_pg_timeout) -> dist.Store | None:
    """Under torchrun's agent store: that store with keys of this restart attempt's own
    (``TORCHELASTIC_RESTART_COUNT``); None elsewhere (``env://`` as it is).  ``timeout``: how long
    an operation waits (joining waits for the slowest rank; ``service.rank_stops``' notes do not).

    Why: torch 2.13's ranks use the agent's store as it is (it says each retry gets a new store;
    torchrun's ``--standalone`` and c10d rendezvous keep one), so after a ``--max-restarts``
    restart the addresses the last attempt's ranks published are still there: a rank that
    joined before its peer had published anew read the dead peer's address and died in
    ``init_process_group`` (gloo's "connectFullMesh failed ... Connection refused", a
    traceback), every attempt, so no restart ever resumed.  Earlier torch versions prefixed
    the keys with the attempt, as this does."""
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"/alexnet/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def replica(model: torch.nn.Module, device: torch.device, compiled: bool = False) -> torch.nn.Module:
    """A ``DistributedDataParallel`` replica of ``model`` (gradients averaged over the ranks) in
    the joined process group.  A towers model spans two devices, so DDP gets no ``device_ids``
    then (its multi-device mode).

    ``compiled``: the step will run it through torch.compile.  Dynamo then splits the graph at
    DDP's gradient buckets (``optimize_ddp``, so each bucket's all-reduce can start during the
    backward pass), and with torch 2.13's Inductor that split lost the gradient flowing back
    across it: one compiled step left conv1-conv5 without their gradients (the update was weight
    decay alone) while fc6-fc8 trained (``tests/test_service_ddp.py``; Inductor's layout
    optimisation off, or a single bucket, also avoided it; 2.11 was right).  The mechanism is one
    PyTorch's developers describe for the split (pytorch/pytorch#108235): each piece is compiled
    apart, and a piece whose output Inductor lays out otherwise than eager hands the next piece
    tensors with strides that piece was not compiled for.  Without the split
    the backward is one graph and the all-reduces start when it ends: each step pays the
    all-reduce's time (about a millisecond on 8 NVLink GPUs, docs/benchmarks.md "Data
    parallelism") instead of a network silently left untrained."""
    if compiled:
        torch._dynamo.config.optimize_ddp = False
    devices = {p.device for p in model.parameters()}
    ids = [device] if device.type == "cuda" and len(devices) == 1 else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def core_share(cores: set[int], place: int, peers: int) -> set[int]:
    """Place ``place``'s part of ``cores`` shared by ``peers`` ranks: the sorted cores cut into
    one contiguous run per rank (sizes differ by at most one), so that ranks binding threads to
    cores do not all bind to the same ones.  Fewer cores than ranks: one core each, round-robin."""
    usable = sorted(cores)
    if peers <= 1:
        return set(usable)
    if len(usable) < peers:
        return {usable[place % len(usable)]}
    return set(usable[place * len(usable) // peers:(place + 1) * len(usable) // peers])


class Agreement:
    """The loop's per-step question to every rank ("stop? checkpoint?"), answered one step late.

    A blocking all-reduce per step puts a gloo round trip (and every rank's slowest arrival) on
    the critical path of each step; this one is started after step k (``async_op``) and its
    answer read after step k+1, by which time it has long arrived: 2 ranks on 2 cores, 1.4 ms a
    step blocking against 0.30 ms lagged (``bench/cpu/agree.json``, docs/benchmarks.md "The
    per-step stop/checkpoint agreement").  Every rank reads the same answers in the same order, so every rank
    still acts at the same step: one step after the question, which is why each answer carries
    the tag (the step) it was asked at.  One process: the answer is the question, at once.
    """

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self._pending: tuple[Any, torch.Tensor, int] | None = None

    def lagged(self, tag: int, *flags: bool) -> tuple[tuple[bool, ...], int | None]:
        """Ask ``flags`` now; returns the agreed answer to the previous question and its tag
        (all False and None when there was none)."""
        if not _CONTROL:
            return flags, tag
        answer = self.settle(len(flags))
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        self._pending = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL[0], async_op=True), t, tag)
        return answer

    def settle(self, n: int) -> tuple[tuple[bool, ...], int | None]:
        """The answer to the question in flight (waiting for it), or all False; nothing stays in flight."""
        if self._pending is None:
            return (False,) * n, None
        work, t, tag = self._pending
        self._pending = None
        work.wait()
        return tuple(bool(v) for v in t.tolist()), tag

    def now(self, *flags: bool) -> tuple[bool, ...]:
        """Blocking: ``flags`` agreed now, or-ed with the answer still in flight (epoch ends,
        evaluation batches: places where acting a step late is not possible)."""
        late, _ = self.settle(len(flags))
        return tuple(a or b for a, b in zip(late, self.ranks.any(*flags)))
