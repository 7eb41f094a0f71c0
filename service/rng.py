"""The random generators a training step draws from, as one rank's checkpointed state: Python's,
torch's CPU generator, and the CUDA generator of each GPU the model uses (dropout draws there).

CUDA states are keyed by device name ("cuda:1"), for the devices in use only.  Version 1 of the
checkpoint saved ``torch.cuda.get_rng_state_all()`` (one state per *visible* GPU) and restored
it by position, so a run resumed with fewer GPUs died with an IndexError, although the device
and the layout may change between a stop and a restart.  Now a restart restores the devices it
shares with the checkpoint, seeds the others afresh from the run's seed, and says both: those
devices draw other dropout masks than an uninterrupted run would have (the training is as
valid, only not bit-identical).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import torch

# Each rank seeds torch with the run's seed plus this stride per rank (rank 0: the seed itself; a
# CUDA device re-seeded at resume adds its index), so that every rank draws its own dropout masks;
# a stride of a million keeps runs with nearby seeds from sharing one.  service.config's MAX_SEED
# keeps the sum within torch's range.
RANK_STRIDE = 1_000_003


def torch_seed(seed: int, rank: int) -> int:
    """The torch seed of ``rank`` in a run seeded ``seed`` (the one rule for ``service.build`` and resume)."""
    return seed + RANK_STRIDE * rank


class RngState:
    """``state_dict()`` / ``load_state_dict()`` of this process's generators."""

    def __init__(self, devices: Iterable[torch.device], seed: int, rank: int,
                 say: Callable[[str], None] = print) -> None:
        self.cuda = sorted({str(d) for d in devices if d.type == "cuda"})
        self.seed, self.rank, self.say = seed, rank, say

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": {name: torch.cuda.get_rng_state(name) for name in self.cuda}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        saved = state.get("cuda") or {}
        restored, reseeded = [], []
        for name in self.cuda:
            if name in saved:
                torch.cuda.set_rng_state(saved[name], name)
                restored.append(name)
            else:
                with torch.cuda.device(name):
                    torch.cuda.manual_seed(torch_seed(self.seed, self.rank) + torch.device(name).index)
                reseeded.append(name)
        unused = sorted(set(saved) - set(self.cuda))
        if reseeded or unused:
            self.say(self.describe(restored, reseeded, unused))

    def describe(self, restored: list[str], reseeded: list[str], unused: list[str]) -> str:
        """One line: which device generators came back, which were seeded afresh, which were left."""
        mine = ", ".join(self.cuda) or "the CPU only"
        parts = [f"rank {self.rank}: random state restored for the CPU" + "".join(f", {d}" for d in restored)]
        if reseeded:
            parts.append(f"re-seeded {', '.join(reseeded)} from seed {self.seed} (not in the checkpoint: its "
                         "dropout draws differ from an uninterrupted run)")
        if unused:
            parts.append(f"not used: the saved state of {', '.join(unused)} (this run uses {mine})")
        return "; ".join(parts)
