"""``lrn="window_sum"`` (LRN as elementwise slices, fusible under torch.compile) equals PyTorch's
``F.local_response_norm`` (per tower), forward and backward, in both layouts and memory orders."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import AlexNet
from model.lrn import LRN, local_response_norm


def relu_maps(channels: int = 96, seed: int = 0) -> torch.Tensor:
    """Activations like conv1's after ReLU (0 .. a few hundred on 0..255 pixels)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(3, channels, 13, 11, generator=gen) * 80).relu().requires_grad_()


@pytest.mark.parametrize("towers", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_window_sum_equals_torch_lrn_forward_and_backward(towers: int, channels_last: bool) -> None:
    x = relu_maps()
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    ref = local_response_norm(x, towers)
    out = local_response_norm(x, towers, impl="window_sum")
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    upstream = torch.randn_like(ref)
    (grad_ref,) = torch.autograd.grad(ref, x, upstream)
    (grad_out,) = torch.autograd.grad(out, x, upstream)
    torch.testing.assert_close(grad_out, grad_ref, rtol=1e-5, atol=1e-7)


def test_window_stays_inside_each_tower() -> None:
    """A spike in tower a's last channel changes tower a's LRN only (per-tower windows)."""
    x = relu_maps().detach()
    spiked = x.clone()
    spiked[:, 47] += 1000.0
    before, after = (local_response_norm(t, 2, impl="window_sum") for t in (x, spiked))
    changed = (after - before).abs().amax(dim=(0, 2, 3)) > 0
    assert changed[45:48].all() and not changed[48:].any() and not changed[:45].any()
    torch.testing.assert_close(after[:, :48], F.local_response_norm(spiked[:, :48], **LRN), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["grouped", "towers"])
def test_model_output_is_the_same_with_either_lrn(layout: str) -> None:
    torch.manual_seed(0)
    torch_lrn = AlexNet(num_classes=10, layout=layout, devices=None if layout == "grouped" else ("cpu", "cpu"))
    window = AlexNet(num_classes=10, layout=layout, devices=None if layout == "grouped" else ("cpu", "cpu"),
                     lrn="window_sum")
    window.load_state_dict(torch_lrn.state_dict())
    x = 50 * torch.randn(2, 3, 224, 224)
    torch_lrn.eval(), window.eval()
    torch.testing.assert_close(window(x), torch_lrn(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lrn"):
        AlexNet(lrn="fused")  # type: ignore[arg-type]
