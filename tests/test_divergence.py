"""``service.divergence.weights_problem``: the check before every checkpoint and at every epoch's
end, on a real model: quiet for finite weights, naming the tensor for a NaN, an inf, and finite
values so large that the run has diverged all the same."""
from __future__ import annotations

import pytest
import torch

from model import AlexNet
from service.divergence import weights_problem


@pytest.mark.parametrize(("value", "said"), [(float("nan"), "is not finite"), (float("-inf"), "is not finite"),
                                             (3e38, "has values so large that their sum overflows")])
def test_a_bad_weight_is_named(value: float, said: str) -> None:
    model = AlexNet(num_classes=10)
    assert weights_problem(model) is None
    with torch.no_grad():
        model.conv4.weight.view(-1)[7] = value
        if value == 3e38:
            model.conv4.weight.view(-1)[8] = value
    assert weights_problem(model) == f"weight conv4.weight {said}"


def test_only_the_first_bad_tensor_is_named() -> None:
    model = AlexNet(num_classes=10)
    with torch.no_grad():
        model.fc7.bias[0] = float("nan")
        model.conv2.bias[3] = float("inf")
    assert weights_problem(model) == "weight conv2.bias is not finite"
