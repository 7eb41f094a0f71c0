"""The paper's update rule (SPEC section 2) as a torch optimizer, and layout-free velocity state.

    v <- momentum * v - weight_decay * lr * w - lr * grad
    w <- w + v

Why not ``torch.optim.SGD(lr, momentum=0.9, weight_decay=5e-4)``? Torch keeps an lr-free buffer
``buf <- 0.9 buf + (grad + wd w)`` and steps ``w <- w - lr buf``. At a constant lr that is the same
sequence of weights (``v = -lr buf``), but lr multiplies the *whole* buffer at every step: the step
after a drop from lr to lr/10 applies lr/10 to momentum accumulated under lr, so torch shrinks the
carried-over velocity tenfold at once. In the paper the velocity already holds the old lr and
decays by 0.9 per step. tests/test_model_optim.py checks both statements against a hand-written
reference.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn


class PaperSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay exactly as in the paper (batch 128, lr 0.01).

    Each parameter's state holds ``velocity`` (the paper's v, which includes the lr). Weight
    decay applies to every parameter in a group; use a group with ``weight_decay=0`` to exempt
    some (the paper does not).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"PaperSGD's {name} must be >= 0, got {value}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(params, group["lr"], group["momentum"], group["weight_decay"])
        return loss

    def _update(self, params: list[Tensor], lr: float, momentum: float, decay: float) -> None:
        """The rule for one group, as multi-tensor ``torch._foreach_*`` kernels: a handful of
        launches per device for all 16 (or 30) tensors instead of ~4 per tensor."""
        paper_update_(params, [p.grad for p in params], self.velocities(params), lr, momentum, decay)

    def velocities(self, params: list[Tensor]) -> list[Tensor]:
        """The velocity of each parameter (zeros the first time)."""
        for p in params:
            if "velocity" not in self.state[p]:
                self.state[p]["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [self.state[p]["velocity"] for p in params]


def paper_update_(params: list[Tensor], grads: list[Tensor], velocities: list[Tensor], lr: float | Tensor,
                  momentum: float, decay: float) -> None:
    """The rule, in place, on tensors of one device.  ``lr`` a float, or a 0-dim tensor on that
    device (``model.step``: compiled, an lr held as data does not change the graph)."""
    # Both terms read w before it moves, as in the paper's equations.
    torch._foreach_mul_(velocities, momentum)
    if isinstance(lr, Tensor):
        if decay:
            torch._foreach_add_(velocities, torch._foreach_mul(params, lr * -decay))
        torch._foreach_add_(velocities, torch._foreach_mul(grads, -lr))
    else:
        if decay:
            torch._foreach_add_(velocities, params, alpha=-decay * lr)
        torch._foreach_add_(velocities, grads, alpha=-lr)
    torch._foreach_add_(params, velocities)


def decay_bound(momentum: float) -> float:
    """The value of ``lr * weight_decay`` at and above which the decay alone diverges.

    Without a gradient the rule is linear in (w, v): ``w' = (1 - a) w + m v``, ``v' = -a w + m v``
    with ``a = lr * weight_decay``.  Its matrix has determinant ``m`` and trace ``1 + m - a``, and
    both eigenvalues lie inside the unit circle exactly while ``0 < a < 2 (1 + m)``: beyond, each
    step flips the weights' sign and grows them, whatever the data (the paper's 0.01 * 5e-4 is
    far inside).  A learning rate that only drops (``model.schedule``) keeps it inside."""
    return 2.0 * (1.0 + momentum)


def param_groups(model: nn.Module, weight_decay: float, bias_decay: bool = True) -> list[dict]:
    """Parameter groups for :class:`PaperSGD`: the paper decays every weight, biases included
    (``bias_decay=True``, the project's default, SPEC 2); Caffe and cuda-convnet exempt biases
    (``bias_decay=False``: biases get ``weight_decay=0``)."""
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    return [{"params": weights, "weight_decay": weight_decay},
            {"params": biases, "weight_decay": weight_decay if bias_decay else 0.0}]


def velocity_state(model: nn.Module, optimizer: PaperSGD, *, copy: bool = True) -> dict[str, Tensor]:
    """The optimizer's velocities keyed like the model's state dict (Caffe layout).

    ``optimizer.state_dict()`` is keyed by parameter position, which differs between the
    grouped (16 parameters) and towers (30) layouts; this form moves between them.
    ``copy=False`` returns the live velocity tensors where it can (grouped layout; the towers
    layout always concatenates): for callers that copy them anyway, e.g. to host memory.
    """
    names = {p: n for n, p in model.named_parameters()}
    per_param = {
        names[p]: optimizer.state[p]["velocity"].detach().clone() if copy else optimizer.state[p]["velocity"]
        for group in optimizer.param_groups
        for p in group["params"]
        if "velocity" in optimizer.state[p]
    }
    merge = getattr(model, "merge_towers", dict)
    return merge(per_param)


def load_velocity_state(model: nn.Module, optimizer: PaperSGD, state: Mapping[str, Tensor]) -> None:
    """Load velocities saved by :func:`velocity_state` from either layout into ``optimizer``,
    into the velocity tensors it already has (a compiled step holds them at fixed addresses)."""
    split = getattr(model, "split_towers", dict)
    per_param = split(state)
    for name, p in model.named_parameters():
        if name in per_param:
            optimizer.velocities([p])[0].copy_(per_param[name])
