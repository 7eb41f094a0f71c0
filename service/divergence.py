"""A diverged run (a training loss or weight that is not a finite number) stops with exit 6.

Too high a learning rate (or augmentation gone wrong) makes the loss overflow; from then on every
step trains on NaN, and without this check the run went on to its last epoch, exited 0, and its
checkpoints of NaN weights pruned the good ones.  Where it is checked, and why there:

- at each log window, the loss the loop reads there anyway (no extra device sync per step);
- before every checkpoint and at each epoch's end (before its evaluation): the epoch's loss sum,
  which holds every step's loss, logged or not, and the weights (a finite loss can still be
  followed by an update that overflows them).  So a non-finite state is never written, and the
  writer never prunes a good checkpoint to make room for one.

Several ranks: every rank checks at the same points and the verdict is agreed (``Ranks.any``),
so every rank stops at the same step.  A NaN loss on one rank is NaN gradients on all of them
after DDP's all-reduce anyway.  Nothing is checkpointed on the way out: the newest checkpoint in
the run directory is the last good state, and the message names it.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from service import checkpoint as ckpt
from service.dist import Ranks
from service.errors import Diverged


def loss_problem(value: float, what: str = "the training loss") -> str | None:
    """What is wrong with a loss read on the host, or None when it is finite."""
    return None if math.isfinite(value) else f"{what} is {value}"


def weights_problem(model: torch.nn.Module) -> str | None:
    """A parameter with a non-finite value (the first of its device's), or None.

    A NaN or inf anywhere makes its tensor's sum non-finite, so one sum per tensor and one device
    read per device decide; only a run found diverged looks closer, to name the tensor.  On the
    2-core development machine the 61M weights took 8.5 ms this way against 197 ms for an
    ``isfinite().all()`` per tensor (a bool copy of every weight, and a read each), time the loop
    stood still before every checkpoint and at every epoch's end: a checkpoint blocked it 134 ms
    then, 38 ms now (``bench/cpu/service.json``, docs/benchmarks.md "Service").  A float32 sum also overflows
    for weights near 1e31 and beyond: diverged as surely, and said so."""
    groups: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in model.named_parameters():
        groups.setdefault(tensor.device, []).append((name, tensor.detach()))
    for group in groups.values():
        sums = torch.stack([t.sum(dtype=torch.float32) for _, t in group])
        if bool(sums.isfinite().all()):
            continue
        for (name, tensor), total in zip(group, sums.tolist()):
            if not math.isfinite(total):
                finite = bool(torch.isfinite(tensor).all())
                return f"weight {name} " + ("has values so large that their sum overflows" if finite else "is not finite")
    return None


def state_problem(epoch_loss_sum: float, model: torch.nn.Module) -> str | None:
    """What is not finite in the state a checkpoint would save: the loss of every step since the
    epoch began (summed: a NaN anywhere stays NaN) and the weights."""
    return loss_problem(epoch_loss_sum, "the epoch's summed training loss") or weights_problem(model)


def agreed(ranks: Ranks, problem: str | None) -> str | None:
    """``problem`` as every rank sees it: one rank's problem is every rank's (named with its rank)."""
    if not ranks.any(problem is not None)[0]:
        return None
    reports = ranks.gather(problem)  # only once something is wrong: which rank, and what
    rank, first = next((r, p) for r, p in enumerate(reports) if p is not None)
    return f"{first} on rank {rank}" if ranks.distributed else first


def refusal(problem: str, step: int, position: str, lr: float, out: Path) -> Diverged:
    """The one line: where it diverged, that nothing of it was saved, which checkpoint is good."""
    found = ckpt.list_checkpoints(out)
    kept = (f"the newest good checkpoint is {found[-1][1]} (resuming it with these settings diverges again)"
            if found else "no checkpoint had been written")
    return Diverged(f"training diverged at step {step} ({position}): {problem}; stopped without checkpointing "
                    f"it, {kept}. Lower optim.lr (now {lr:g}) and start over with --fresh true or another --out")
