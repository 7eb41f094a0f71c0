"""Low precision and optimizer choices: LRN in float32 under autocast, float16 only with a
GradScaler, and the bias weight-decay choice (paper vs Caffe)."""
from __future__ import annotations

import pytest
import torch

from model import AlexNet, PaperSGD, param_groups, train_step
from model.lrn import local_response_norm

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lrn_of_low_precision_input_matches_float32(device, dtype):
    """Activations above 256 square to inf in float16: LRN's output used to collapse to 0 there
    (and PyTorch's CPU kernels have no float16/bfloat16 LRN at all)."""
    x = torch.rand(2, 96, 9, 9, device=device) * 600  # conv1 ReLU outputs on 0..255 pixels reach this
    reference = local_response_norm(x, towers=2)
    low = local_response_norm(x.to(dtype), towers=2)
    assert low.dtype == dtype and torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() <= 0.01 * reference.abs().max()
    assert low.float().abs().min() > 0 or reference.abs().min() == 0


@pytest.mark.slow
def test_float16_needs_a_scaler_and_trains_with_one():
    torch.manual_seed(0)
    model = AlexNet(num_classes=10, bias_init=0.1)
    x, y = 50 * torch.randn(4, 3, 224, 224), torch.randint(0, 10, (4,))
    opt = PaperSGD(model.parameters())
    with pytest.raises(ValueError, match="GradScaler"):
        train_step(model, opt, x, y, autocast_dtype=torch.float16)
    before = model.fc8.weight.detach().clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loss = train_step(model, opt, x, y, autocast_dtype=torch.float16, scaler=scaler)
    assert torch.isfinite(loss) and not torch.equal(before, model.fc8.weight)
    assert scaler.state_dict()["scale"] > 0


@pytest.mark.parametrize("bias_decay", [True, False])
def test_bias_decay_choice(bias_decay):
    """With zero gradients one step moves only by the decay term: -lr * wd * w.  Biases decay
    in the paper (default) and are exempt in Caffe/cuda-convnet (``bias_decay=False``)."""
    model = AlexNet(num_classes=10, bias_init=1.0)
    opt = PaperSGD(param_groups(model, 5e-4, bias_decay), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    bias, weight = model.fc6.bias.detach().clone(), model.fc6.weight.detach().clone()
    opt.step()
    expected_bias = bias * (1 - 0.01 * 5e-4) if bias_decay else bias
    torch.testing.assert_close(model.fc6.bias.detach(), expected_bias)
    torch.testing.assert_close(model.fc6.weight.detach(), weight * (1 - 0.01 * 5e-4))
    assert len(opt.param_groups) == 2 and sum(len(g["params"]) for g in opt.param_groups) == 16
