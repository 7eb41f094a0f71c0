"""The paper's initialisation (SPEC section 2).

Weights ~ N(0, 0.01) in every layer; biases = 1 in conv2, conv4, conv5, fc6, fc7 and 0 in conv1,
conv3, fc8. The constant 1 is configurable because with it the loss can sit at ln(classes) for a
long time (Caffe switched to 0.1); the paper's value stays the default.
"""
from __future__ import annotations

import torch
from torch import nn

WEIGHT_STD = 0.01
ONE_BIAS_LAYERS = frozenset({"conv2", "conv4", "conv5", "fc6", "fc7"})


@torch.no_grad()
def init_paper(model: nn.Module, *, bias: float = 1.0, std: float = WEIGHT_STD) -> None:
    """Initialise ``model`` (an AlexNet of either layout) as in the paper.

    Works on the state dict (keys ``<layer>.weight`` / ``<layer>.bias``) and loads it back, so the
    draws happen in the same order and shapes in both layouts: one seed, one set of weights.
    """
    state = model.state_dict()
    for key, tensor in state.items():
        layer, kind = key.rsplit(".", 1)
        if kind == "weight":
            tensor.normal_(0.0, std)
        elif kind == "bias":
            tensor.fill_(bias if layer.split(".")[-1] in ONE_BIAS_LAYERS else 0.0)
    model.load_state_dict(state)
