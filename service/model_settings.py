"""The ``model`` section of the service's settings (``service.config``): which AlexNet layout, on
which devices, at what precision and compiled how, and the rules a run's values must meet before
anything starts (with the ``loader`` keys that must agree with them: dtype, memory format, crop).

Its own module because ``service.predict`` rebuilds a trained model from these settings alone,
without the rest of a run's configuration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from model.alexnet import INPUT_SIDES, InputChannels
from model.lrn import LrnImpl
from model.step import CAN_TRACE_BACKWARD, CompileMode, TraceBackward
from pipeline.config import LoaderConfig

LayoutSetting = Literal["grouped", "towers", "auto"]  # model.alexnet.Layout, or "auto" (resolved at start)
Autocast = Literal["none", "bfloat16", "float16"]
LAYOUTS = get_args(LayoutSetting)
AUTOCAST = get_args(Autocast)


@dataclass(frozen=True)
class ModelSettings:
    """Which AlexNet layout, where, and how fast (see ``model.AlexNet``)."""

    # "grouped" (one device), "towers" (one tower per device) or "auto": towers when a single
    # process (not torchrun) sees two GPUs, grouped otherwise (the paper's two GPUs when there are two).
    layout: LayoutSetting = "grouped"
    devices: tuple[str, ...] = ()  # towers: (device_a, device_b); empty = cuda:0,cuda:1 or the run's device twice
    bias_init: float = 1.0  # the paper's non-zero bias; Caffe's 0.1 avoids a long flat start
    dropout: float = 0.5
    autocast: Autocast = "none"  # float16 adds a GradScaler
    channels_last: bool = False
    # "off"; "model": nn.Module.compile (forward and its backward; the optimizer eager; evaluation
    # recompiles); "step": model.step, the whole training step (forward, backward, update) as one
    # compiled function and evaluation as another, each compiled once.
    compile: Literal["off", "model", "step"] = "off"
    compile_mode: CompileMode = "default"  # torch.compile's mode; "reduce-overhead" and "max-autotune" add CUDA graphs
    # model.compile step: "on" traces loss.backward() into the step's one graph, "off" breaks the
    # graph there (forward+backward, then the update), "auto" traces from torch 2.13 on (model.step);
    # with several ranks (DDP) the backward stays outside the graph either way
    trace_backward: TraceBackward = "auto"
    lrn: LrnImpl = "torch"  # "window_sum": the same LRN as fusible elementwise ops (model.lrn)
    # 4: conv1 reads the image with a fourth, zero channel (the same function and parameters;
    # cuDNN's NHWC first-layer kernels want 4 channels, not 3: model.AlexNet)
    input_channels: InputChannels = 3
    cudnn_benchmark_limit: int = 10  # cuDNN algorithms tried per convolution shape (0 = all); CUDA only


def model_problems(m: ModelSettings, loader: LoaderConfig) -> list[str]:
    """Every problem with the ``model`` section, alone and with the ``loader`` keys that must agree with it."""
    problems = []
    if m.layout not in LAYOUTS:
        problems.append(f"model.layout must be one of {LAYOUTS}, got {m.layout!r}")
    if m.devices and (len(m.devices) != 2 or not all(device_name_ok(d, auto=False) for d in m.devices)):
        problems.append(f"model.devices must be two devices (e.g. cuda:0,cuda:1) or empty, got {list(m.devices)}")
    elif m.devices and m.layout == "grouped" and m.devices[0] != m.devices[1]:  # two devices: a second to compare
        problems.append("model.devices names two devices but model.layout is grouped (one device): use towers")
    if m.autocast not in AUTOCAST:
        problems.append(f"model.autocast must be one of {AUTOCAST}, got {m.autocast!r}")
    if loader.dtype != "float32" and m.autocast == "none":
        problems.append(f"loader.dtype {loader.dtype} needs model.autocast bfloat16 or float16 "
                        "(with model.autocast none the float32 weights meet lower-precision images); "
                        "set both, or loader.dtype float32")
    if m.compile == "step" and m.autocast == "float16":
        problems.append("model.compile step does not take model.autocast float16 (its gradient scaler checks "
                        "for overflow on the host every step): use bfloat16, or model.compile model")
    if m.trace_backward == "on" and (m.compile != "step" or not CAN_TRACE_BACKWARD):
        problems.append("model.trace_backward on needs model.compile step and a torch that can trace backward() "
                        "into a graph (one with torch._dynamo.config.trace_autograd_ops): use auto or off")
    if loader.memory_format == "channels_last" and not m.channels_last:
        problems.append("loader.memory_format channels_last needs model.channels_last true (the batch is made "
                        "in the model's layout); set both, or loader.memory_format contiguous")
    if m.cudnn_benchmark_limit < 0:
        problems.append(f"model.cudnn_benchmark_limit must be >= 0 (0 = try every algorithm), got "
                        f"{m.cudnn_benchmark_limit}")
    if not 0 <= m.dropout < 1:
        problems.append(f"model.dropout must be in [0, 1), got {m.dropout}")
    if loader.crop not in INPUT_SIDES:
        problems.append(f"loader.crop {loader.crop} does not fit the network: fc6 takes the 6x6 map that "
                        f"crops of {INPUT_SIDES[0]} to {INPUT_SIDES[-1]} px give (the paper's is 224)")
    if not math.isfinite(m.bias_init):
        problems.append(f"model.bias_init must be a finite number, got {m.bias_init}")
    return problems


def device_name_ok(name: str, auto: bool = True) -> bool:
    if name in ("cpu", "cuda") or (auto and name == "auto"):
        return True
    kind, _, index = name.partition(":")
    return kind == "cuda" and index.isdigit()
