"""PlateauSchedule: lr / 10 after `patience` evaluations without a new best, at most three times."""
import pytest
import torch

from model import PaperSGD, PlateauSchedule


def _schedule(**kwargs):
    opt = PaperSGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    return opt, PlateauSchedule(opt, **kwargs)


def test_no_drop_while_improving():
    opt, sched = _schedule(patience=1)
    assert [sched.step(e) for e in (0.9, 0.8, 0.7, 0.6)] == [False] * 4
    assert opt.param_groups[0]["lr"] == 0.01


def test_drop_after_patience_then_wait_again():
    opt, sched = _schedule(patience=2)
    decisions = [sched.step(e) for e in (0.5, 0.6, 0.55)]  # new best, then two without
    assert decisions == [False, False, True]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    assert sched.step(0.52) is False  # a fresh wait of `patience` at the new rate
    assert sched.step(0.51) is True
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0001)


def test_at_most_three_drops():
    opt, sched = _schedule(patience=1)
    sched.step(0.5)
    drops = sum(sched.step(0.5) for _ in range(10))
    assert drops == 3 and sched.drops == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_min_delta_counts_tiny_gains_as_no_improvement():
    opt, sched = _schedule(patience=1, min_delta=0.01)
    sched.step(0.5)
    assert sched.step(0.495) is True


def test_state_dict_resumes_the_same_decisions():
    errors = [0.7, 0.6, 0.65, 0.66, 0.5, 0.52, 0.53, 0.54, 0.55, 0.56]
    opt, sched = _schedule(patience=2)
    for e in errors[:5]:
        sched.step(e)
    saved = sched.state_dict()
    rest = [sched.step(e) for e in errors[5:]]
    opt2, resumed = _schedule(patience=2)
    resumed.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == pytest.approx(saved["lrs"][0])
    assert [resumed.step(e) for e in errors[5:]] == rest
    assert resumed.lrs == sched.lrs and any(rest)
