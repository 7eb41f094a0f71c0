"""Which tower sees what, found by experiment: perturb tower a somewhere, watch both towers later.

A tower-b output that does not move proves the towers are separate up to that layer; a tower-b
output that moves proves a cross-tower connection in between. The halves of a grouped-layout
activation are (first half = tower a, second half = tower b); a towers-layout layer yields (a, b).
"""
import pytest
import torch

from model import AlexNet

LAYOUTS = {"grouped": {}, "towers": {"devices": ("cpu", "cpu")}}

# (where tower a is perturbed, tower-b activations that must not change, activations whose a
# and b halves must both change). "X.out"/"X.in" = output/input of layer X.
CASES = [
    ("conv1.out", ["conv2.out"], ["conv3.out"]),  # LRN1 and pool1 stay within a tower
    ("conv2.in", ["conv2.out"], ["conv3.out"]),  # after pool1: conv2 own tower, conv3 both
    ("conv2.out", ["conv3.in"], ["conv3.out"]),  # LRN2 and pool2 stay within a tower
    ("conv4.in", ["conv4.out", "conv5.out"], ["fc6.out"]),
    ("conv5.in", ["conv5.out"], ["fc6.out"]),
    ("fc6.out", [], ["fc7.out"]),
    ("fc7.out", [], ["fc8.out"]),
]


def _halves(value):
    """(tower a, tower b) of a hook's value: a pair from the towers layout, or one tensor."""
    if isinstance(value, tuple) and len(value) == 2:
        return value
    tensor = value[0] if isinstance(value, tuple) else value
    return tensor.chunk(2, dim=1)


def _perturb_a(value, generator):
    """Return ``value`` with tower a's half shifted by noise of its own scale."""
    a, b = _halves(value)
    noisy = a + a.std() * torch.randn(a.shape, generator=generator)
    if isinstance(value, tuple) and len(value) == 2:
        return (noisy, b)
    return (torch.cat([noisy, b], dim=1),) if isinstance(value, tuple) else torch.cat([noisy, b], dim=1)


def _run(model, x, perturb_at=None):
    """Forward once; return {"layer.in"/"layer.out": (a, b)} for every layer."""
    seen, handles = {}, []
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_children():

        def pre(mod, args, name=name):
            if perturb_at == f"{name}.in":
                args = _perturb_a(args, generator)
            seen[f"{name}.in"] = tuple(h.clone() for h in _input_halves(name, args))
            return args

        def post(mod, args, out, name=name):
            if perturb_at == f"{name}.out":
                out = _perturb_a(out, generator)
            seen[f"{name}.out"] = tuple(h.clone() for h in _halves(out))
            return out

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _input_halves(name, args):
    # A cross-tower layer of the towers layout gets (cat(a, b) on device a, the same on device b):
    # split its first argument to see the (a, b) that the grouped layout's input holds.
    if len(args) == 2 and name in ("conv3", "fc6", "fc7"):
        return args[0].chunk(2, dim=1)
    return _halves(args)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def model_and_baseline(request):
    torch.manual_seed(0)
    model = AlexNet(num_classes=10, layout=request.param, **LAYOUTS[request.param]).eval()
    x = 50 * torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return model, x, _run(model, x)


@pytest.mark.parametrize("perturb_at, same_in_b, changed_in_both", CASES)
def test_perturbing_tower_a(model_and_baseline, perturb_at, same_in_b, changed_in_both):
    model, x, base = model_and_baseline
    new = _run(model, x, perturb_at=perturb_at)
    for point in same_in_b:
        assert torch.equal(new[point][1], base[point][1]), f"tower b at {point} moved"
        if point.endswith(".out"):  # and the perturbation did reach tower a there
            assert not torch.allclose(new[point][0], base[point][0]), f"tower a at {point} did not move"
    for point in changed_in_both:
        for tower in (0, 1):
            assert not torch.allclose(new[point][tower], base[point][tower], rtol=1e-4, atol=0), (
                f"tower {'ab'[tower]} at {point} did not move"
            )


def test_experiment_detects_a_cross_connection(model_and_baseline):
    """Negative control: the same check must fail across a layer that does mix the towers."""
    model, x, base = model_and_baseline
    new = _run(model, x, perturb_at="conv2.out")
    assert not torch.equal(new["conv3.out"][1], base["conv3.out"][1])
