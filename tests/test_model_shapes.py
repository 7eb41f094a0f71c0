"""Parameter counts (SPEC 1 table), output shapes, and one state dict for both layouts."""
import pytest
import torch

from model import AlexNet

CPU2 = ("cpu", "cpu")

# SPEC section 1, "params (w+b)" column.
SPEC_PARAMS = {
    "conv1": 34_944,
    "conv2": 307_456,
    "conv3": 885_120,
    "conv4": 663_936,
    "conv5": 442_624,
    "fc6": 37_752_832,
    "fc7": 16_781_312,
    "fc8": 4_097_000,
}


def _per_layer(named_tensors):
    counts = {}
    for name, t in named_tensors:
        layer = name.split(".")[0]
        counts[layer] = counts.get(layer, 0) + t.numel()
    return counts


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    grouped = AlexNet()
    torch.manual_seed(0)
    towers = AlexNet(layout="towers", devices=CPU2)
    return {"grouped": grouped, "towers": towers}


@pytest.mark.parametrize("layout", ["grouped", "towers"])
def test_parameter_count_per_layer_and_total(models, layout):
    model = models[layout]
    assert _per_layer(model.named_parameters()) == SPEC_PARAMS
    assert _per_layer(model.state_dict().items()) == SPEC_PARAMS
    assert sum(p.numel() for p in model.parameters()) == 60_965_224


@pytest.mark.parametrize("layout", ["grouped", "towers"])
@pytest.mark.parametrize("batch", [1, 4])
def test_output_shape(models, layout, batch):
    model = models[layout].eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, 224, 224))
    assert out.shape == (batch, 1000)
    assert torch.isfinite(out).all()


def test_state_dict_is_caffe_layout_in_both_layouts(models):
    grouped, towers = models["grouped"].state_dict(), models["towers"].state_dict()
    assert list(grouped) == list(towers)
    assert {k: v.shape for k, v in grouped.items()} == {k: v.shape for k, v in towers.items()}
    assert grouped["conv2.weight"].shape == (256, 48, 5, 5)
    assert grouped["conv4.weight"].shape == (384, 192, 3, 3)
    assert grouped["conv5.weight"].shape == (256, 192, 3, 3)
    # One seed, one set of weights: the init draws in state-dict order in both layouts.
    assert all(torch.equal(grouped[k], towers[k]) for k in grouped)


def test_first_half_of_each_tensor_is_tower_a(models):
    towers = models["towers"]
    state = towers.state_dict()
    assert torch.equal(state["conv2.weight"][:128], towers.conv2.a.weight)
    assert torch.equal(state["conv2.weight"][128:], towers.conv2.b.weight)
    assert torch.equal(state["fc6.bias"][2048:], towers.fc6.b.bias)


def test_checkpoint_moves_between_layouts():
    torch.manual_seed(1)
    src = AlexNet(num_classes=10, layout="grouped")
    torch.manual_seed(2)
    dst = AlexNet(num_classes=10, layout="towers", devices=CPU2)
    assert not torch.equal(src.state_dict()["conv3.weight"], dst.state_dict()["conv3.weight"])
    dst.load_state_dict(src.state_dict())  # strict
    back = AlexNet(num_classes=10, layout="grouped")
    back.load_state_dict(dst.state_dict())
    for key, value in src.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    assert torch.equal(dst.conv5.b.weight, src.conv5.weight[128:])


def test_strict_load_still_rejects_wrong_keys():
    model = AlexNet(num_classes=10, layout="towers", devices=CPU2)
    state = model.state_dict()
    state["conv9.weight"] = state.pop("conv2.weight")
    with pytest.raises(RuntimeError):
        model.load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError):
        AlexNet(num_classes=10, layout="pipes")
    with pytest.raises(ValueError):
        AlexNet(num_classes=10, layout="grouped", devices=("cpu", "meta"))
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError):
            AlexNet(num_classes=10, layout="towers")


def test_input_sides_are_the_crops_the_network_takes(models):
    """``INPUT_SIDES`` (the layers' arithmetic, what the service validates loader.crop against)
    agrees with the real forward pass at both ends and just outside them."""
    from model.alexnet import INPUT_SIDES
    model = models["grouped"].eval()
    assert (INPUT_SIDES[0], INPUT_SIDES[-1]) == (224, 255) and len(INPUT_SIDES) == 32
    with torch.no_grad():
        for side in (INPUT_SIDES[0], INPUT_SIDES[-1]):
            assert model(torch.zeros(1, 3, side, side)).shape == (1, 1000)
        for side in (INPUT_SIDES[0] - 1, INPUT_SIDES[-1] + 1):
            with pytest.raises(RuntimeError):
                model(torch.zeros(1, 3, side, side))
