"""``model.step.CompiledStep``: the same step as ``train_step`` (padding included), and compiled
once: no recompile for the lr drop, the epoch's short or empty last batch, a resume, evaluation."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from model import AlexNet, PaperSGD, PlateauSchedule, evaluate, load_velocity_state, train_step, velocity_state
from model.optim import paper_update_, param_groups
from model.step import BACKWARD_IN_GRAPH, CAN_TRACE_BACKWARD, CompiledEval, CompiledStep, traces_backward


def replica(num_classes: int = 10, dropout: float = 0.0) -> tuple[AlexNet, PaperSGD]:
    """The paper's model and optimizer (by default without dropout: a padded batch draws more
    dropout masks than the unpadded one)."""
    torch.manual_seed(0)
    model = AlexNet(num_classes=num_classes, bias_init=0.1, dropout=dropout)
    return model, PaperSGD(param_groups(model, 5e-4), lr=0.01)


def batch(n: int, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return 50 * torch.randn(n, 3, 224, 224, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def assert_same_model(a: AlexNet, b: AlexNet, opt_a: PaperSGD, opt_b: PaperSGD, rel: float) -> None:
    """Weights and velocities equal up to ``rel`` of each tensor's largest velocity (the size of
    a step) plus float32 rounding of the weights themselves."""
    va, vb = velocity_state(a, opt_a), velocity_state(b, opt_b)
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values()):
        atol = rel * float(va[name].abs().max()) + 1e-12
        torch.testing.assert_close(wa, wb, rtol=1e-6, atol=atol, msg=name)
        torch.testing.assert_close(va[name], vb[name], rtol=0, atol=atol, msg=name)


def test_tensor_lr_rule_equals_the_float_rule() -> None:
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    grads = [torch.randn_like(p) for p in params]
    v_float, v_tensor = [torch.randn_like(p) for p in params], None
    v_tensor = [v.clone() for v in v_float]
    p_float, p_tensor = [p.clone() for p in params], [p.clone() for p in params]
    paper_update_(p_float, grads, v_float, 0.01, 0.9, 5e-4)
    paper_update_(p_tensor, grads, v_tensor, torch.tensor(0.01), 0.9, 5e-4)
    for a, b in zip(p_float + v_float, p_tensor + v_tensor):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_padded_short_and_empty_batches_equal_the_unpadded_step() -> None:
    """Built for batch 4, fed 4, 3 and 0 samples: each step (loss, gradients through the update,
    velocities) is the eager ``train_step`` on the unpadded batch; gradients left over from
    earlier work are not added in."""
    eager, eager_opt = replica()
    model, opt = replica()
    step = CompiledStep(model, opt, batch_size=4, compile=False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    for n in (4, 3, 0):
        images, labels = batch(n, seed=n)
        expected = train_step(eager, eager_opt, images, labels)
        got = step(images, labels)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert_same_model(model, eager, opt, eager_opt, rel=1e-5)
    with pytest.raises(ValueError, match="at most 4"):
        step(*batch(5))


def test_the_step_on_the_towers_layout_on_one_device_equals_the_grouped_step() -> None:
    """The sweep's "two towers as plain convs" lever (``--model.layout towers`` on one GPU) runs
    this step on a towers model: each step leaves the same weights and velocities as the grouped
    model's eager ``train_step`` (its optimizer buckets hold 30 parameters, not 16)."""
    grouped, grouped_opt = replica()
    torch.manual_seed(0)
    towers = AlexNet(num_classes=10, layout="towers", devices=("cpu", "cpu"), bias_init=0.1, dropout=0.0)
    towers.load_state_dict(grouped.state_dict())
    towers_opt = PaperSGD(param_groups(towers, 5e-4), lr=0.01)
    step = CompiledStep(towers, towers_opt, batch_size=4, compile=False)
    for n in (4, 3):
        images, labels = batch(n, seed=n)
        torch.testing.assert_close(step(images, labels), train_step(grouped, grouped_opt, images, labels),
                                   rtol=1e-5, atol=1e-6)
        weights, velocities = towers.state_dict(), velocity_state(towers, towers_opt)
        for name, want in velocity_state(grouped, grouped_opt).items():
            atol = 1e-5 * float(want.abs().max()) + 1e-12
            torch.testing.assert_close(velocities[name], want, rtol=0, atol=atol, msg=name)
            torch.testing.assert_close(weights[name], grouped.state_dict()[name], rtol=1e-6, atol=atol, msg=name)


def copy_state(dst: AlexNet, dst_opt: PaperSGD, src: AlexNet, src_opt: PaperSGD) -> None:
    with torch.no_grad():
        for a, b in zip(dst.parameters(), src.parameters()):
            a.copy_(b)
    load_velocity_state(dst, dst_opt, velocity_state(src, src_opt))


def assert_same_update(a: AlexNet, b: AlexNet, opt_a: PaperSGD, opt_b: PaperSGD, tol: float) -> None:
    """The velocities (the step just taken) agree to ``tol`` in relative L2 norm, tensor by tensor."""
    va, vb = velocity_state(a, opt_a), velocity_state(b, opt_b)
    for name in va:
        assert (va[name] - vb[name]).norm() <= tol * vb[name].norm(), name


@pytest.mark.slow
@pytest.mark.parametrize("trace", [
    "auto",
    pytest.param("on", marks=pytest.mark.skipif(BACKWARD_IN_GRAPH or not CAN_TRACE_BACKWARD,
                                                reason="the same as auto here, or not possible")),
    "off"])
def test_compiled_step_equals_eager_and_compiles_once(trace: str) -> None:
    """The real AlexNet (1000 classes, dropout 0.5) compiled on the CPU: one compilation, then no
    recompile for the lr drop, a short and an empty last batch, a resume (velocities loaded in
    place) and evaluation, with the backward traced into the graph or the graph broken there
    (``trace_backward``; "on" is the 2.11 lever, tested where "auto" does not trace).  Each step
    is compared with the same step run eagerly from the same weights, velocities and RNG state
    (inductor's ``fallback_random`` draws the dropout masks as eager PyTorch does): the same loss,
    and the same update up to float rounding.  (Rounding
    alone can move a max-pool's argmax between two nearly equal values, which moves a few
    gradient entries of the conv layers: about 1e-3 of their norm, measured against a float64
    step; a wrong lr or a missing momentum term would be O(1).)"""
    eager, eager_opt = replica(1000, dropout=0.5)
    model, opt = replica(1000, dropout=0.5)
    step = CompiledStep(model, opt, batch_size=2, trace_backward=trace)
    eager_step = CompiledStep(eager, eager_opt, 2, compile=False)
    schedules = PlateauSchedule(opt, patience=1), PlateauSchedule(eager_opt, patience=1)
    torch._dynamo.reset()
    counters.clear()

    def both(n: int, seed: int, reference=eager_step) -> None:
        copy_state(eager, eager_opt, model, opt)
        images, labels = batch(n, 1000, seed)
        torch.manual_seed(seed)
        got = step(images, labels)
        torch.manual_seed(seed)
        torch.testing.assert_close(got, reference(images, labels), rtol=1e-4, atol=1e-5, msg=f"{n=} {seed=}")
        assert_same_update(model, eager, opt, eager_opt, tol=2e-2)

    with torch._inductor.config.patch(fallback_random=True):
        both(2, 0, lambda x, y: train_step(eager, eager_opt, x, y))  # compiles; the plain eager step
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):  # any recompilation raises
            both(2, 1)
            for s in schedules:
                s.step(0.5), s.step(0.6)  # no improvement: lr / 10
            assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
            both(2, 2)
            both(1, 3)  # the epoch's short last batch
            both(0, 4)  # a rank's empty last batch
            both(2, 5)  # after load_velocity_state (in copy_state): what a resume does
            images, labels = batch(3, 1000, 6)
            evaluate(model, [(images[:, None].expand(3, 10, 3, 224, 224), labels)])
            evaluate(model, [(images[:1], labels[:1])])
    assert counters["stats"]["unique_graphs"] == graphs
    if traces_backward(trace):  # one graph: forward, backward and update
        assert graphs == 1 and not counters["graph_break"]
    else:  # forward with its backward (AOTAutograd), then the update
        assert graphs == 2 and sum(counters["graph_break"].values()) == 1


@pytest.mark.slow
def test_compiled_evaluation_compiles_once_and_equals_eager() -> None:
    """``CompiledEval`` in ``evaluate``: batches of 2 images x 10 views, then a last one of 1
    image: one compilation, the same errors and loss as the eager model."""
    model, _ = replica(1000)
    images, labels = batch(3, 1000, 7)
    views = images[:, None].expand(3, 10, 3, 224, 224)
    batches = [(views[:2], labels[:2]), (views[2:], labels[2:])]
    evaluator = CompiledEval(model, batch_size=20)
    torch._dynamo.reset()
    counters.clear()
    evaluate(evaluator, batches[:1])  # compiles
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = evaluate(evaluator, batches)
    assert counters["stats"]["unique_graphs"] == graphs == 1
    eager = evaluate(model, batches)
    assert compiled.images == eager.images == 3
    assert (compiled.top1_error, compiled.top5_error) == (eager.top1_error, eager.top5_error)
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-5)
    with pytest.raises(ValueError, match="at most 20"):
        evaluator(views.flatten(0, 1))


@pytest.mark.parametrize("mode, graphs", [("default", False), ("reduce-overhead", True), ("max-autotune", True),
                                          ("max-autotune-no-cudagraphs", False)])
def test_every_mode_that_records_cuda_graphs_marks_each_step(mode: str, graphs: bool) -> None:
    """Each step and evaluation call starts a new CUDA-graph generation
    (``cudagraph_mark_step_begin``) in every compile mode that records graphs: "max-autotune"
    does too, and was treated as one that does not."""
    model, opt = replica()
    assert CompiledStep(model, opt, 4, mode=mode).cudagraphs is graphs
    assert CompiledEval(model, 4, mode=mode).cudagraphs is graphs
    assert not CompiledStep(model, opt, 4, mode=mode, compile=False).cudagraphs
