"""Initialisation statistics (SPEC 2) and per-tower LRN against the formula written out in numpy."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import AlexNet
from model.lrn import local_response_norm

ONE_BIAS = {"conv2", "conv4", "conv5", "fc6", "fc7"}
ZERO_BIAS = {"conv1", "conv3", "fc8"}


@pytest.fixture(scope="module", params=["grouped", "towers"])
def state(request):
    torch.manual_seed(0)
    devices = ("cpu", "cpu") if request.param == "towers" else None
    return AlexNet(layout=request.param, devices=devices).state_dict()


def test_weights_are_gaussian_with_std_0_01(state):
    for layer in ONE_BIAS | ZERO_BIAS:
        w = state[f"{layer}.weight"].double().flatten()
        n = w.numel()
        # Five standard errors of the sample mean and standard deviation of n N(0, 0.01) draws.
        assert abs(w.mean().item()) < 5 * 0.01 / n**0.5, layer
        assert abs(w.std().item() - 0.01) < 5 * 0.01 / (2 * n) ** 0.5, layer
        within_one_sigma = (w.abs() < 0.01).double().mean().item()
        assert abs(within_one_sigma - 0.6827) < 5 * (0.6827 * 0.3173 / n) ** 0.5, layer


def test_biases_are_one_or_zero(state):
    for layer in ONE_BIAS:
        assert torch.all(state[f"{layer}.bias"] == 1.0), layer
    for layer in ZERO_BIAS:
        assert torch.all(state[f"{layer}.bias"] == 0.0), layer


@pytest.mark.parametrize("layout", ["grouped", "towers"])
def test_bias_constant_is_configurable(layout):
    devices = ("cpu", "cpu") if layout == "towers" else None
    state = AlexNet(num_classes=10, layout=layout, devices=devices, bias_init=0.1).state_dict()
    for layer in ONE_BIAS:
        assert torch.allclose(state[f"{layer}.bias"], torch.full_like(state[f"{layer}.bias"], 0.1)), layer
    for layer in ZERO_BIAS:
        assert torch.all(state[f"{layer}.bias"] == 0.0), layer


def lrn_numpy(x: np.ndarray, towers: int, size=5, alpha=1e-4, beta=0.75, k=2.0) -> np.ndarray:
    """b_c = a_c / (k + alpha/size * sum of a_j^2 over j in [c-2, c+2] within c's tower)^beta."""
    out = np.empty_like(x)
    per_tower = x.shape[1] // towers
    for c in range(x.shape[1]):
        first = c - c % per_tower  # the tower's first channel: the window stops at its edges
        lo, hi = max(first, c - size // 2), min(first + per_tower, c + size // 2 + 1)
        out[:, c] = x[:, c] / (k + alpha / size * (x[:, lo:hi] ** 2).sum(axis=1)) ** beta
    return out


def test_lrn_per_tower_matches_formula():
    # Activations of ~100 make the normaliser (k + ...) differ clearly from k alone.
    x = 100 * torch.randn(2, 96, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = lrn_numpy(x.numpy(), towers=2)
    np.testing.assert_allclose(local_response_norm(x, towers=2).numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(local_response_norm(x[:, :48], towers=1).numpy(), want[:, :48], rtol=1e-12)
    # A window that crosses the tower boundary is a different function near channel 48.
    crossing = lrn_numpy(x.numpy(), towers=1)
    assert not np.allclose(crossing[:, 46:50], want[:, 46:50], rtol=1e-6)
    np.testing.assert_allclose(crossing[:, :46], want[:, :46], rtol=1e-12)


@pytest.mark.parametrize("layout", ["grouped", "towers"])
def test_model_applies_lrn1_per_tower(layout):
    """pool1's output inside the model equals maxpool(numpy LRN(relu(conv1))) tower by tower."""
    devices = ("cpu", "cpu") if layout == "towers" else None
    model = AlexNet(num_classes=10, layout=layout, devices=devices).eval()
    seen = {}
    if layout == "grouped":
        model.conv1.register_forward_hook(lambda m, args, out: seen.__setitem__("conv1", out))
        model.conv2.register_forward_pre_hook(lambda m, args: seen.__setitem__("pool1", args[0]))
    else:
        model.conv1.register_forward_hook(lambda m, args, out: seen.__setitem__("conv1", torch.cat(out, 1)))
        model.conv2.register_forward_pre_hook(lambda m, args: seen.__setitem__("pool1", torch.cat(args, 1)))
    with torch.no_grad():
        model(50 * torch.randn(1, 3, 224, 224))
    normed = lrn_numpy(F.relu(seen["conv1"]).double().numpy(), towers=2)
    want = F.max_pool2d(torch.from_numpy(normed), kernel_size=3, stride=2)
    assert seen["pool1"].shape == (1, 96, 27, 27)
    np.testing.assert_allclose(seen["pool1"].double().numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
