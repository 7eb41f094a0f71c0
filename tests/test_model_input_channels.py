"""``input_channels=4`` (conv1 on the image plus a zero channel, for cuDNN's NHWC first-layer
kernels) is the same network: the same parameters, outputs and gradients as the plain conv1, in
both layouts and memory orders, and the setting reaches the model from the service's flags."""
from __future__ import annotations

import pytest
import torch

from model import AlexNet


def pair(layout: str, **kwargs) -> AlexNet:
    torch.manual_seed(0)
    return AlexNet(num_classes=10, layout=layout, devices=None if layout == "grouped" else ("cpu", "cpu"), **kwargs)


@pytest.mark.parametrize("layout", ["grouped", "towers"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_four_input_channels_compute_the_same_function_and_gradients(layout: str, channels_last: bool) -> None:
    plain, padded = pair(layout), pair(layout, input_channels=4)
    padded.load_state_dict(plain.state_dict())
    assert {k: v.shape for k, v in padded.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert padded.state_dict()["conv1.weight"].shape == (96, 3, 11, 11)
    x = 50 * torch.randn(2, 3, 224, 224)
    if channels_last:
        plain, padded = plain.to(memory_format=torch.channels_last), padded.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    plain.eval(), padded.eval()
    out_plain, out_padded = plain(x), padded(x)
    torch.testing.assert_close(out_padded, out_plain, rtol=1e-5, atol=1e-5)
    out_plain.square().sum().backward()
    out_padded.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), padded.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_the_first_layer_really_reads_four_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The zero channel is there (else the setting would measure nothing on a GPU)."""
    calls, real = [], torch.nn.functional.conv2d

    def spy(x, weight, *args, **kwargs):
        calls.append((tuple(x.shape), tuple(weight.shape)))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    pair("grouped", input_channels=4)(torch.randn(1, 3, 224, 224))
    assert calls[0] == ((1, 4, 227, 227), (96, 4, 11, 11))
    with pytest.raises(ValueError, match="input_channels"):
        AlexNet(input_channels=5)  # type: ignore[arg-type]


def test_the_service_flag_reaches_the_model(sample_shards) -> None:
    from service.app import parse
    from service.build import build_model, resolve
    from service.dist import Ranks

    cfg = resolve(parse(["--shards", str(sample_shards), "--model.input_channels", "4"]), Ranks())
    assert cfg.model.input_channels == 4
    assert build_model(cfg, 10).input_channels == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_four_input_channels_on_cudnn_in_bf16_channels_last() -> None:
    """The path the lever is for: cuDNN, bf16 autocast, NHWC.  The same network within bf16's
    rounding (the two convolutions may use different algorithms, so not bit for bit)."""
    plain, padded = pair("grouped").cuda(), pair("grouped", input_channels=4).cuda()
    padded.load_state_dict(plain.state_dict())
    plain, padded = (m.to(memory_format=torch.channels_last).eval() for m in (plain, padded))
    x = (50 * torch.randn(16, 3, 224, 224, device="cuda")).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", torch.bfloat16):
        out_plain, out_padded = plain(x).float(), padded(x).float()
    assert (out_padded - out_plain).norm() / out_plain.norm() < 2e-2
    out_plain.square().mean().backward()
    out_padded.square().mean().backward()
    g_plain, g_padded = plain.conv1.weight.grad, padded.conv1.weight.grad
    assert g_padded.shape == (96, 3, 11, 11)
    assert (g_padded - g_plain).norm() / g_plain.norm() < 3e-2
