"""The towers layout and the grouped layout compute the same function and the same gradients."""
import pytest
import torch
import torch.nn.functional as F

from model import AlexNet

RTOL = 1e-5
# On a GPU the two layouts run different cuDNN kernels (one grouped convolution against two
# plain ones), whose weight-gradient algorithms round differently: measured on an H200 with TF32
# off, outputs agreed within 1e-5 and conv2's weight gradient within 1.3e-3 (max abs difference
# over max abs value).  A layout bug (a tower's channels swapped, LRN across the towers) is O(1).
RTOL_GPU_GRADS = 1e-2


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _outputs_and_grads(model, x, labels):
    model.eval()  # dropout off: both layouts must then agree exactly up to float rounding
    model.zero_grad(set_to_none=True)
    out = model(x.to(model.input_device))
    F.cross_entropy(out, labels.to(out.device)).backward()
    grads = model.merge_towers({n: p.grad for n, p in model.named_parameters()})
    return out, grads


def _compare_layouts(grouped_device, tower_devices, grad_rtol=RTOL):
    torch.manual_seed(0)
    grouped = AlexNet(num_classes=10).to(grouped_device)
    towers = AlexNet(num_classes=10, layout="towers", devices=tower_devices)
    torch.manual_seed(3)  # different weights, so the load below is what makes them equal
    towers.load_state_dict(grouped.state_dict())
    x = 50 * torch.randn(3, 3, 224, 224)
    labels = torch.tensor([1, 4, 7])

    out_g, grads_g = _outputs_and_grads(grouped, x, labels)
    out_t, grads_t = _outputs_and_grads(towers, x, labels)
    assert out_t.device == torch.device(tower_devices[0])
    assert _relative_error(out_t, out_g) <= RTOL
    assert set(grads_t) == set(grads_g) == set(grouped.state_dict())
    for key in grads_g:
        assert grads_g[key].abs().max() > 0, f"{key} got no gradient: the comparison would be empty"
        error = _relative_error(grads_t[key], grads_g[key])
        print(f"{key}: gradient relative error {error:.2e}")
        assert error <= grad_rtol, key


@pytest.mark.slow
def test_towers_on_two_cpu_devices_match_grouped():
    _compare_layouts("cpu", ("cpu", "cpu"))


def test_comparison_catches_a_wrong_tower_order():
    """The check can fail: swap tower a and b in conv4 of the towers model and it must differ."""
    torch.manual_seed(0)
    grouped = AlexNet(num_classes=10).eval()
    towers = AlexNet(num_classes=10, layout="towers", devices=("cpu", "cpu")).eval()
    state = grouped.state_dict()
    state["conv4.weight"] = torch.cat(state["conv4.weight"].chunk(2)[::-1])
    state["conv4.bias"] = torch.cat(state["conv4.bias"].chunk(2)[::-1])
    towers.load_state_dict(state)
    x = 50 * torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert _relative_error(towers(x), grouped(x)) > RTOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_towers_on_gpus_match_grouped():
    """On two GPUs when present, else on cuda:0 twice; TF32 off so fp32 means fp32."""
    tower_devices = ("cuda:0", "cuda:1") if torch.cuda.device_count() >= 2 else ("cuda:0", "cuda:0")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _compare_layouts("cuda:0", tower_devices, grad_rtol=RTOL_GPU_GRADS)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
