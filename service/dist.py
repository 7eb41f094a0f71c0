"""Who this process is among the ranks of a run: the one place that knows about torchrun.

torchrun (SPEC 8) starts one process per GPU and tells each its ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` through the environment.  The rest of the service asks this module instead of
the environment: which device to use, which part of the data to read (the loader's
``rank``/``world_size``), whether to write checkpoints (rank 0 only), which HTTP port to serve
(base + LOCAL_RANK, so every rank of a node has its own scrape target), and how to combine
per-rank values (each rank's loader position goes into rank 0's checkpoint).

Today a run is one process (``WORLD_SIZE`` 1): ``Ranks.check_supported`` refuses more, since
without gradient synchronisation every rank would train its own model.  Adding DDP is local
to this module and the model set-up: ``init_process_group`` in ``start``, the collectives
below (``gather``, ``any``) become ``all_gather_object``/``all_reduce``, and the model is
wrapped in ``DistributedDataParallel``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Ranks:
        """Read torchrun's variables (absent = a single process)."""
        env = os.environ if env is None else env
        ranks = cls(_int_env(env, "RANK", 0), _int_env(env, "WORLD_SIZE", 1), _int_env(env, "LOCAL_RANK", 0))
        if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size or ranks.local_rank < 0:
            raise RankError(f"RANK={ranks.rank} WORLD_SIZE={ranks.world_size} LOCAL_RANK={ranks.local_rank} "
                            "is not a valid torchrun environment")
        return ranks

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, the history and the curve."""
        return self.rank == 0

    def check_supported(self) -> None:
        """Refuse several ranks until gradients are synchronised (DDP, the next step)."""
        if self.world_size > 1:
            raise RankError(f"WORLD_SIZE={self.world_size}: this version trains in one process; multi-process "
                            "training (torchrun + DDP) is not implemented yet. Run one process per machine.")

    def http_port(self, base: int) -> int:
        """Base port + LOCAL_RANK (0 stays 0: any free port)."""
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
        """Every rank's ``value``, by rank (on every rank).  One process: ``[value]``."""
        return [value]

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank's ``flag`` is true (a stop must be agreed on)."""
        return flag

    def info(self) -> dict[str, Any]:
        """For logs and /status."""
        return {"rank": self.rank, "world_size": self.world_size, "local_rank": self.local_rank}
