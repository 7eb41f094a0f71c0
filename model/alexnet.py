"""The 2012 two-tower AlexNet (SPEC section 1) in two layouts of one function.

``grouped``: one device. conv2/conv4/conv5 use ``groups=2`` and LRN runs on each half of the
channels, so the first half of every activation is tower a and the second half tower b.

``towers``: tower a and tower b are separate modules (``conv2.a``, ``conv2.b``, ...) that may
live on two devices. Activations cross devices only at the inputs of conv3, fc6, fc7 and fc8,
exactly where the paper's two GPUs communicated.

Both layouts share one state dict in Caffe's layout (``conv2.weight`` is 256x48x5x5, first half
= tower a): the towers layout concatenates its halves when saving and splits them when loading,
so a checkpoint moves between layouts with plain ``load_state_dict``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.init import init_paper
from model.lrn import LrnImpl, local_response_norm

Layout = Literal["grouped", "towers"]
InputChannels = Literal[3, 4]
DeviceLike = torch.device | str | int

# 3 px of zero padding bottom/right so a 224 input gives a whole 55x55 conv1 map.
CONV1_PAD = (0, 3, 0, 3)  # (left, right, top, bottom)

# Per-tower shapes. "own": a tower sees only its own previous layer; "both": it sees both towers
# (the cross-GPU connections); "image": both towers see the whole input image.
# conv: (in per tower, out per tower, kernel, stride, padding, input)
CONVS: dict[str, tuple[int, int, int, int, int, str]] = {
    "conv1": (3, 48, 11, 4, 0, "image"),
    "conv2": (48, 128, 5, 1, 2, "own"),
    "conv3": (256, 192, 3, 1, 1, "both"),
    "conv4": (192, 192, 3, 1, 1, "own"),
    "conv5": (192, 128, 3, 1, 1, "own"),
}
# fc: (in features, out features per tower); both take both towers' outputs.
FCS: dict[str, tuple[int, int]] = {"fc6": (256 * 6 * 6, 2048), "fc7": (4096, 2048)}
POOLED = ("conv1", "conv2", "conv5")  # followed by the overlapping 3/2 max pool


def feature_side(side: int) -> int:
    """The side of the map fc6 gets from a ``side`` x ``side`` input; fc6 takes 6 (``FCS``).  The
    layers' arithmetic, so that a crop the network cannot take is refused before anything is built
    rather than failing in the first forward pass."""
    for name, (_, _, k, stride, pad, _) in CONVS.items():
        side = (side + (sum(CONV1_PAD[:2]) if name == "conv1" else 2 * pad) - k) // stride + 1
        if name in POOLED:
            side = (side - 3) // 2 + 1
    return side


# Every input side the network takes: 224 (the paper's crop) to 255.
INPUT_SIDES = tuple(s for s in range(1, 1024) if feature_side(s) == 6)


def _norm_pool(x: Tensor, towers: int = 1, lrn_fp32: bool = True, lrn: LrnImpl = "torch") -> Tensor:
    """ReLU -> per-tower LRN -> overlapping 3/2 max pool (the order of the paper and Caffe)."""
    return F.max_pool2d(local_response_norm(F.relu(x), towers, lrn_fp32, lrn), kernel_size=3, stride=2)


def _exchange(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's inter-GPU step: each tower gets (a, b) on its own device, tower a first."""
    return torch.cat([a, b.to(a.device)], dim=1), torch.cat([a.to(b.device), b], dim=1)


class TowerPair(nn.Module):
    """One layer as two modules, ``a`` and ``b``, saved and loaded as one Caffe-layout tensor.

    Every tensor of the layer (weight and bias) is the concatenation of tower a's and tower b's
    along dim 0 (output channels or features), so ``conv2.a.weight`` is ``conv2.weight[:128]``.
    """

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.a, self.b = make(), make()
        self.register_state_dict_post_hook(_merge_hook)
        self.register_load_state_dict_pre_hook(_split_hook)

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return self.a(a), self.b(b)


def merge_halves(tensors: dict[str, Tensor], prefix: str) -> None:
    """In place: replace ``{prefix}a.X`` and ``{prefix}b.X`` by ``{prefix}X`` = cat(a, b).

    Tower b's half is copied to tower a's device (a state dict has one tensor per key).
    """
    for name in ("weight", "bias"):
        a, b = tensors.pop(f"{prefix}a.{name}", None), tensors.pop(f"{prefix}b.{name}", None)
        if a is not None and b is not None:
            tensors[prefix + name] = torch.cat([a, b.to(a.device)], dim=0)


def split_halves(tensors: dict[str, Tensor], prefix: str) -> None:
    """In place: the inverse of :func:`merge_halves` (first half to tower a)."""
    for name in ("weight", "bias"):
        whole = tensors.pop(prefix + name, None)
        if whole is not None:
            a, b = whole.chunk(2, dim=0)
            tensors[f"{prefix}a.{name}"], tensors[f"{prefix}b.{name}"] = a, b


def _merge_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    merge_halves(state_dict, prefix)


def _split_hook(module: nn.Module, state_dict: dict, prefix: str, *unused: object) -> None:
    split_halves(state_dict, prefix)


def _conv(spec: tuple[int, int, int, int, int, str], towers: int) -> nn.Conv2d:
    """The conv for ``towers`` towers at once: 2 -> grouped layout, 1 -> one tower."""
    cin, cout, k, stride, pad, sees = spec
    groups = towers if sees == "own" else 1
    cin = cin * groups  # an "own" layer's input is both towers' maps, seen group by group
    return nn.Conv2d(cin, cout * towers, k, stride=stride, padding=pad, groups=groups)


class AlexNet(nn.Module):
    """The paper's network: 60,965,224 parameters for 1000 classes, 3x224x224 input -> logits.

    Args:
        num_classes: size of fc8.
        layout: ``"grouped"`` (one device, grouped convolutions) or ``"towers"`` (tower a and
            tower b as separate modules, possibly on two devices).
        devices: ``(device_a, device_b)``. For ``towers``: where tower a (and fc8) and tower b
            live; ``None`` means ``("cuda:0", "cuda:1")`` and needs two GPUs. Both may be the
            same device. For ``grouped``: ``None`` (CPU; use ``.to()``) or two equal devices.
        bias_init: the non-zero bias constant of SPEC 2 (paper 1.0; Caffe used 0.1).
        dropout: dropout probability after fc6 and fc7.
        lrn_fp32: under float16/bfloat16 autocast, compute LRN in float32 (see
            :func:`local_response_norm`; ``make gpu-check`` measures what it costs).
        lrn: how LRN is computed, "torch" or "window_sum" (the same function, fusible under
            ``torch.compile``; :func:`local_response_norm`).
        input_channels: 4 gives the image a fourth channel of zeros in the pad conv1 needs anyway,
            and conv1 a zero weight for it (:meth:`_first_conv`): the same function and the same
            parameters (conv1.weight stays 96x3x11x11), for cuDNN's NHWC kernels, which want a
            channel count of 4 or 8 to use tensor cores on a first layer; 3 is the plain conv.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        layout: Layout = "grouped",
        devices: Sequence[DeviceLike] | None = None,
        *,
        bias_init: float = 1.0,
        dropout: float = 0.5,
        lrn_fp32: bool = True,
        lrn: LrnImpl = "torch",
        input_channels: InputChannels = 3,
    ) -> None:
        super().__init__()
        for name, value, kind in (("layout", layout, Layout), ("lrn", lrn, LrnImpl),
                                  ("input_channels", input_channels, InputChannels)):
            if value not in get_args(kind):
                raise ValueError(f"{name} must be {' or '.join(map(repr, get_args(kind)))}, got {value!r}")
        self.input_channels = input_channels
        self.layout: Layout = layout
        self.dropout = dropout
        self.lrn_fp32, self.lrn = lrn_fp32, lrn
        grouped = layout == "grouped"
        for name, spec in CONVS.items():
            self.add_module(name, _conv(spec, 2) if grouped else TowerPair(lambda: _conv(spec, 1)))
        for name, (fin, fout) in FCS.items():
            self.add_module(name, nn.Linear(fin, 2 * fout) if grouped else TowerPair(lambda: nn.Linear(fin, fout)))
        self.fc8 = nn.Linear(4096, num_classes)
        # Initialised on the CPU through the state dict, so one seed gives the same weights in both layouts.
        init_paper(self, bias=bias_init)
        self._place(devices)

    def _place(self, devices: Sequence[DeviceLike] | None) -> None:
        """Move the towers (or the whole grouped model) to their devices."""
        if devices is None and self.layout == "grouped":
            return
        if devices is None:
            if torch.cuda.device_count() < 2:
                raise ValueError("layout='towers' needs devices=(device_a, device_b) unless two GPUs are present")
            devices = ("cuda:0", "cuda:1")
        if len(devices) != 2:
            raise ValueError(f"devices must be (device_a, device_b), got {devices!r}")
        dev_a, dev_b = (torch.device(d) for d in devices)
        if self.layout == "grouped":
            if dev_a != dev_b:
                raise ValueError("layout='grouped' runs on one device; use layout='towers' for two")
            self.to(dev_a)
            return
        for pair in self.tower_pairs():
            pair.a.to(dev_a)
            pair.b.to(dev_b)
        self.fc8.to(dev_a)  # fc8 is one layer on tower a's device; the logits come out there

    def tower_pairs(self) -> list[TowerPair]:
        """The split layers of the towers layout (empty for the grouped layout)."""
        return [m for m in self.children() if isinstance(m, TowerPair)]

    @property
    def input_device(self) -> torch.device:
        """Where images should be sent (tower a's device; tower b gets its own copy)."""
        return self.conv1.a.weight.device if self.layout == "towers" else self.conv1.weight.device

    @property
    def output_device(self) -> torch.device:
        """Where the logits come out (and where labels should be)."""
        return self.fc8.weight.device

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of 3x224x224 images (N, 3, 224, 224) -> (N, num_classes)."""
        x = F.pad(x, CONV1_PAD + ((0, 1) if self.input_channels == 4 else ()))
        return self._forward_grouped(x) if self.layout == "grouped" else self._forward_towers(x)

    @staticmethod
    def _first_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
        """conv1; on a 4-channel input (``input_channels=4``) with its weight padded by a zero
        input channel, so the zero channel adds exactly nothing and gets no gradient."""
        if x.shape[1] == conv.in_channels:
            return conv(x)
        weight = F.pad(conv.weight, (0, 0, 0, 0, 0, x.shape[1] - conv.in_channels))
        return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding)

    def _forward_grouped(self, x: Tensor) -> Tensor:
        x = _norm_pool(self._first_conv(self.conv1, x), 2, self.lrn_fp32, self.lrn)
        x = _norm_pool(self.conv2(x), 2, self.lrn_fp32, self.lrn)
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = F.max_pool2d(F.relu(self.conv5(x)), kernel_size=3, stride=2).flatten(1)
        x = F.dropout(F.relu(self.fc6(x)), self.dropout, self.training)
        x = F.dropout(F.relu(self.fc7(x)), self.dropout, self.training)
        return self.fc8(x)

    def _forward_towers(self, x: Tensor) -> Tensor:
        # Both towers see the whole image; every later device crossing is an _exchange.
        xa, xb = x.to(self.conv1.a.weight.device), x.to(self.conv1.b.weight.device)
        a, b = self.conv1(xa, xb) if self.input_channels == 3 else (
            self._first_conv(self.conv1.a, xa), self._first_conv(self.conv1.b, xb))

        def norm(t: Tensor) -> Tensor:
            return _norm_pool(t, 1, self.lrn_fp32, self.lrn)
        a, b = self.conv2(norm(a), norm(b))
        a, b = self.conv3(*_exchange(norm(a), norm(b)))
        a, b = self.conv4(F.relu(a), F.relu(b))
        a, b = self.conv5(F.relu(a), F.relu(b))
        a, b = (F.max_pool2d(F.relu(t), kernel_size=3, stride=2).flatten(1) for t in (a, b))
        a, b = self.fc6(*_exchange(a, b))
        a, b = (F.dropout(F.relu(t), self.dropout, self.training) for t in (a, b))
        a, b = self.fc7(*_exchange(a, b))
        a, b = (F.dropout(F.relu(t), self.dropout, self.training) for t in (a, b))
        return self.fc8(torch.cat([a, b.to(self.fc8.weight.device)], dim=1))

    def merge_towers(self, per_param: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Re-key tensors named like ``named_parameters()`` (gradients, optimizer state) to
        state-dict keys, concatenating tower halves. The identity for the grouped layout."""
        tensors = dict(per_param)
        for pair_name, _ in self._named_pairs():
            merge_halves(tensors, pair_name + ".")
        return tensors

    def split_towers(self, per_key: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The inverse of :meth:`merge_towers`: state-dict keys -> ``named_parameters()`` names."""
        tensors = dict(per_key)
        for pair_name, _ in self._named_pairs():
            split_halves(tensors, pair_name + ".")
        return tensors

    def _named_pairs(self) -> list[tuple[str, TowerPair]]:
        return [(n, m) for n, m in self.named_children() if isinstance(m, TowerPair)]
