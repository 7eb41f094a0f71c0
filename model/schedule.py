"""The paper's learning-rate schedule: divide by 10 when the validation error stops improving.

The paper reduced the rate three times over about 90 epochs and does not say how "stops
improving" was judged; here it is ``patience`` evaluations in a row without a new best
validation error (better by more than ``min_delta``), and at most ``max_drops`` drops.
"""
from __future__ import annotations

import math
from typing import Any

import torch


class PlateauSchedule:
    """Call :meth:`step` with each validation error; it lowers every group's lr in place."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        patience: int = 3,
        factor: float = 0.1,
        max_drops: int = 3,
        min_delta: float = 0.0,
    ) -> None:
        for ok, rule, value in ((patience >= 1, "patience >= 1", patience), (0 < factor < 1, "0 < factor < 1", factor),
                                (max_drops >= 0, "max_drops >= 0", max_drops),
                                (min_delta >= 0, "min_delta >= 0", min_delta)):
            if not ok:
                raise ValueError(f"PlateauSchedule needs {rule}, got {value}")
        self.optimizer = optimizer
        self.patience, self.factor, self.max_drops, self.min_delta = patience, factor, max_drops, min_delta
        self.best = math.inf
        self.evals_without_improvement = 0
        self.drops = 0

    @property
    def lrs(self) -> list[float]:
        """The current lr of each parameter group."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self, val_error: float) -> bool:
        """Record one validation error; return True when this call lowered the lr."""
        if val_error < self.best - self.min_delta:
            self.best = val_error
            self.evals_without_improvement = 0
            return False
        self.evals_without_improvement += 1
        if self.evals_without_improvement < self.patience or self.drops >= self.max_drops:
            return False
        for group in self.optimizer.param_groups:
            group["lr"] *= self.factor
        self.drops += 1
        # A fresh wait at the new rate; the best error so far stays the bar to beat.
        self.evals_without_improvement = 0
        return True

    def forget_best(self) -> None:
        """Wait for a new best afresh: the errors to come are measured another way (other views),
        and a bar set by the old measure would count as plateau, or as progress, what is neither."""
        self.best = math.inf
        self.evals_without_improvement = 0

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, including the current lrs."""
        return {
            "best": self.best,
            "evals_without_improvement": self.evals_without_improvement,
            "drops": self.drops,
            "lrs": self.lrs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` and put its lrs back into the optimizer."""
        self.best = float(state["best"])
        self.evals_without_improvement = int(state["evals_without_improvement"])
        self.drops = int(state["drops"])
        if len(state["lrs"]) != len(self.optimizer.param_groups):
            raise ValueError("saved lrs do not match the optimizer's parameter groups")
        for group, lr in zip(self.optimizer.param_groups, state["lrs"]):
            group["lr"] = lr
