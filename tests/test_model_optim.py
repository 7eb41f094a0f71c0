"""PaperSGD against the paper's rule written out by hand, torch's SGD at an lr drop, and
velocity state that moves between layouts."""
import numpy as np
import pytest
import torch

from model import AlexNet, PaperSGD, load_velocity_state, train_step, velocity_state
from model.optim import decay_bound

MOMENTUM, DECAY = 0.9, 5e-4
RNG = np.random.default_rng(0)
A, Y = RNG.normal(size=(8, 5)), RNG.normal(size=8)
B, Z = RNG.normal(size=(6, 3)), RNG.normal(size=6)
LRS = [0.05] * 6 + [0.005] * 6 + [0.0005] * 4  # two drops


def _grads(w: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient of 0.5 |A w - y|^2 + 0.5 |B u - z|^2, by hand."""
    return A.T @ (A @ w - Y), B.T @ (B @ u - Z)


def _reference(steps_lrs):
    """The paper: v <- 0.9 v - 0.0005 lr w - lr grad ; w <- w + v. Returns w, u after each step."""
    w, u = np.ones(5), np.full(3, -0.5)
    vw, vu = np.zeros(5), np.zeros(3)
    history = []
    for lr in steps_lrs:
        gw, gu = _grads(w, u)
        vw = MOMENTUM * vw - DECAY * lr * w - lr * gw
        vu = MOMENTUM * vu - DECAY * lr * u - lr * gu
        w, u = w + vw, u + vu
        history.append((w.copy(), u.copy()))
    return history


def _run(make_optimizer, steps_lrs):
    w = torch.ones(5, dtype=torch.float64, requires_grad=True)
    u = torch.full((3,), -0.5, dtype=torch.float64, requires_grad=True)
    a, y, b, z = (torch.from_numpy(t) for t in (A, Y, B, Z))
    opt = make_optimizer([w, u], steps_lrs[0])
    history = []
    for lr in steps_lrs:
        for group in opt.param_groups:
            group["lr"] = lr  # what PlateauSchedule does at a drop
        opt.zero_grad()
        loss = 0.5 * ((a @ w - y) ** 2).sum() + 0.5 * ((b @ u - z) ** 2).sum()
        loss.backward()
        opt.step()
        history.append((w.detach().numpy().copy(), u.detach().numpy().copy()))
    return history


def _paper(params, lr):
    return PaperSGD(params, lr=lr, momentum=MOMENTUM, weight_decay=DECAY)


def _torch_sgd(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=DECAY)


def test_paper_sgd_matches_hand_written_rule_across_lr_drops():
    for (w, u), (w_ref, u_ref) in zip(_run(_paper, LRS), _reference(LRS), strict=True):
        np.testing.assert_allclose(w, w_ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(u, u_ref, rtol=1e-12, atol=1e-14)


def test_torch_sgd_is_the_same_at_constant_lr_and_not_after_a_drop():
    ours, theirs, first_drop = _run(_paper, LRS), _run(_torch_sgd, LRS), LRS.index(0.005)
    for step in range(first_drop):
        np.testing.assert_allclose(theirs[step][0], ours[step][0], rtol=1e-12)
    # The step after the drop: both add the same fresh term -lr_new (grad + wd w); the carried-over
    # momentum is 0.9 v in the paper and 0.9 v / 10 in torch (its buffer gets the new lr).
    before = ours[first_drop - 1][0]
    w_prev = ours[first_drop - 2][0]
    carried = MOMENTUM * (before - w_prev)  # 0.9 v, with v the last paper step
    fresh = ours[first_drop][0] - before - carried
    torch_carried = theirs[first_drop][0] - before - fresh
    np.testing.assert_allclose(torch_carried, carried / 10, rtol=1e-9)
    assert not np.allclose(theirs[first_drop][0], ours[first_drop][0], rtol=1e-6)


def test_parameters_without_gradient_are_left_alone_and_closure_runs():
    used, unused = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = PaperSGD([used, unused], lr=0.1)
    loss = opt.step(lambda: (used**2).sum().backward() or (used**2).sum())
    assert loss is not None
    assert torch.equal(unused, torch.ones(3)) and "velocity" not in opt.state[unused]
    # One step from v = 0: w <- w - 0.0005 lr w - lr 2w
    assert torch.allclose(used, torch.full((3,), 1 - 0.1 * 5e-4 - 0.2))


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_the_decay_alone_shrinks_the_weights_inside_its_bound_and_grows_them_at_it(momentum: float) -> None:
    """``decay_bound`` (service.config refuses settings past it): with zero gradients the rule is the
    decay alone; 1% inside the bound the weights shrink over 3000 steps, at the bound and 1% past
    it they do not (at it they oscillate at a constant size, past it they grow)."""
    lr, limit = 0.01, decay_bound(momentum)

    def size_after(decay: float) -> float:
        w = torch.ones(4, dtype=torch.float64, requires_grad=True)
        opt = PaperSGD([w], lr=lr, momentum=momentum, weight_decay=decay / lr)
        for _ in range(3000):
            w.grad = torch.zeros_like(w)
            opt.step()
        return w.detach().abs().max().item()

    assert size_after(0.99 * limit) < 1e-3
    assert size_after(limit) >= 1 - 1e-6
    assert size_after(1.01 * limit) > 1e6


@pytest.mark.slow
@pytest.mark.parametrize("src_layout, dst_layout", [("grouped", "towers"), ("towers", "grouped")])
def test_velocity_moves_between_layouts(src_layout, dst_layout):
    """Resume mid-training in the other layout: the next step matches staying put."""

    def make(layout):
        devices = ("cpu", "cpu") if layout == "towers" else None
        return AlexNet(num_classes=10, layout=layout, devices=devices, dropout=0.0)  # no RNG in the step

    torch.manual_seed(0)
    src = make(src_layout)
    src_opt = PaperSGD(src.parameters())
    x, labels = 50 * torch.randn(2, 3, 224, 224), torch.tensor([3, 8])
    train_step(src, src_opt, x, labels)
    dst = make(dst_layout)
    dst_opt = PaperSGD(dst.parameters())
    dst.load_state_dict(src.state_dict())
    load_velocity_state(dst, dst_opt, velocity_state(src, src_opt))
    assert velocity_state(dst, dst_opt).keys() == src.state_dict().keys()

    start = {k: v.clone() for k, v in src.state_dict().items()}
    train_step(src, src_opt, x, labels)
    train_step(dst, dst_opt, x, labels)
    want, got = src.state_dict(), dst.state_dict()
    v_want, v_got = velocity_state(src, src_opt), velocity_state(dst, dst_opt)
    for key in want:
        # Compare the second step's update (a missing velocity would change it by ~100%);
        # the weights themselves are float32, so allow their rounding.
        step_want, step_got = want[key] - start[key], got[key] - start[key]
        assert (step_got - step_want).abs().max() <= 1e-4 * step_want.abs().max(), key
        assert (v_got[key] - v_want[key]).abs().max() <= 1e-4 * v_want[key].abs().max(), key
