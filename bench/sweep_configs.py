"""The sweep's configurations (``bench.sweep``): each a list of the service's own flags.

A configuration names what it measures; ``bench.sweep`` decides the order they run in (the
measurements a decision needs first, within the budget).  What a configuration costs is mostly
compilation: the first compile of a graph (AlexNet's whole training step) takes on the order of a
minute, a graph compiled before in the same inductor cache loads in seconds.  ``Config.graphs``
names the graphs a configuration compiles by the flags that shape them, so the sweep can tell a
cheap configuration (its graphs compiled already) from an expensive one before it starts it.
"""
from __future__ import annotations

from dataclasses import dataclass

BASE = ("--model.autocast", "bfloat16", "--model.channels_last", "true", "--loader.batch_size", "128")
STEP = ("--model.compile", "step")
GRAPHS = (*STEP, "--model.compile_mode", "reduce-overhead")
BF16_BATCHES = ("--loader.dtype", "bfloat16", "--loader.memory_format", "channels_last")
DRY = ("--loader.batch_size", "8", "--loader.threads", "2", "--model.autocast", "none", "--model.channels_last", "false")
# kind: (warmup batches, timed batches) on a GPU and in the dry mode
SIZES = {"model": ((15, 60), (1, 2)), "pipeline": ((10, 60), (1, 3)), "train": ((25, 150), (1, 3))}
# Flags that change the compiled graph (its inputs' dtype, layout and shape, the model, the mode).
# cudnn_benchmark_limit and the loader's own settings do not: the graph is the same, from the cache.
GRAPH_FLAGS = ("--loader.dtype", "--loader.memory_format", "--loader.batch_size", "--loader.crop")


def values(flags: tuple[str, ...]) -> dict[str, str]:
    """``--key value`` pairs as a dict (the later of repeated keys wins, as in the service's parser)."""
    return dict(zip(flags[::2], flags[1::2]))


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # "model" | "pipeline" | "train"
    flags: tuple[str, ...]
    cap: float  # seconds
    eval: bool = False  # model: also time the 10-view evaluation forward
    profile: bool = False  # train: a torch.profiler window after the timed one

    @property
    def compiles(self) -> bool:
        return values(self.flags).get("--model.compile", "off") != "off" and self.kind != "pipeline"

    @property
    def graphs(self) -> frozenset[tuple]:
        """The graphs this configuration compiles (none when nothing does): the training step, and
        the evaluation forward when it is timed, each identified by the flags that shape it."""
        if not self.compiles:
            return frozenset()
        shape = tuple(sorted((k, v) for k, v in values(self.flags).items()
                             if (k.startswith("--model.") and k != "--model.cudnn_benchmark_limit") or k in GRAPH_FLAGS))
        return frozenset({("step", shape)} | ({("eval", shape)} if self.eval else set()))


# The models the end-to-end stage can stand on, in order: the first of these that runs is it.
BASE_MODELS = [
    Config("model: compiled step + CUDA graphs", "model", (*BASE, *GRAPHS), 150, eval=True),
    Config("model: compiled step", "model", (*BASE, *STEP), 240, eval=True),
    Config("model: eager", "model", (*BASE, "--model.compile", "off"), 60, eval=True),
]
# Each on top of the compiled step with CUDA graphs, alone; those that gain are then combined.
MODEL_LEVERS = [
    # The forward, backward and update in one graph where torch breaks at backward() by default
    # (2.11, the GPU machines' version; with 2.13 "auto" traces it already: the same graph, which
    # then loads from the inductor cache, at the cost of a place in the round compiled ahead).
    ("backward in the graph", ("--model.trace_backward", "on")),
    ("LRN window_sum", ("--model.lrn", "window_sum")),
    ("conv1 on 4 channels", ("--model.input_channels", "4")),
    ("bf16 channels_last batches", BF16_BATCHES),
    ("NCHW", ("--model.channels_last", "false")),
    ("cuDNN tries every algorithm", ("--model.cudnn_benchmark_limit", "0")),
    # The towers layout on one GPU: conv2/4/5 as two plain convolutions on the halves instead of
    # one groups=2 convolution (cuDNN's grouped kernels are not always its fastest), the same
    # function and state dict (tests/test_model_layouts.py).
    ("two towers as plain convs", ("--model.layout", "towers")),
]
BATCHES = [  # options only: the recipe is batch 128
    Config(f"model: step + graphs, batch {b} (lr {lr}, linear rule)", "model",
           (*BASE, *GRAPHS, "--loader.batch_size", str(b), "--optim.lr", lr), 150)
    for b, lr in ((256, "0.02"), (512, "0.04"))
]


def model_lever(*levers: tuple[str, tuple[str, ...]]) -> Config:
    """The compiled step with CUDA graphs and ``levers`` on top."""
    return Config("model: step + graphs, " + " + ".join(label for label, _ in levers), "model",
                  (*BASE, *GRAPHS, *(x for _, flags in levers for x in flags)), 150)


MODEL = [*BASE_MODELS[:2], *(model_lever(lever) for lever in MODEL_LEVERS), BASE_MODELS[2], *BATCHES]
PIPELINE = [Config(f"pipeline: {label}", "pipeline", (*BASE, "--model.compile", "off", *flags), 60) for label, flags in (
    ("defaults (hw decoder 0.65, fancy upsampling, all cores, prefetch 2)", ()),
    ("hw_decoder_load 1.0", ("--loader.hw_decoder_load", "1.0")),
    ("hw_decoder_load 1.0, no fancy upsampling",
     ("--loader.hw_decoder_load", "1.0", "--loader.jpeg_fancy_upsampling", "false")),
    ("no fancy upsampling", ("--loader.jpeg_fancy_upsampling", "false")),
    ("hw_decoder_load 0 (all hybrid: the CPU-time reference)", ("--loader.hw_decoder_load", "0")),
    ("8 threads, prefetch 4", ("--loader.threads", "8", "--loader.prefetch", "4")),
    ("stream hand-over", ("--loader.handover", "stream")),
)]
TODAY = Config("e2e: the service today (compile model, loader defaults)", "train", (*BASE, "--model.compile", "model"),
               200, profile=True)
# What the sweep may compile ahead, side by side (bench.sweep_compile), most needed first: the model
# the end-to-end stage stands on, the bf16-batch lever's step (the one end-to-end lever with a graph
# of its own), the model levers (criterion 1), then the rest.
_BF16_LEVER = model_lever(next(lever for lever in MODEL_LEVERS if lever[1] == BF16_BATCHES))
AHEAD = [BASE_MODELS[0], _BF16_LEVER, *(model_lever(lever) for lever in MODEL_LEVERS if lever[1] != BF16_BATCHES),
         BASE_MODELS[1], TODAY, *BATCHES]
# End-to-end levers, most likely to matter first (the hand-over is issue 13's main suspect; one run
# gained 20% from threads and prefetch).  bf16 batches change the step's input, so the graph: last.
LEVERS = [
    ("stream hand-over", ("--loader.handover", "stream")),
    ("8 threads, prefetch 4", ("--loader.threads", "8", "--loader.prefetch", "4")),
    ("hw decoder 1.0", ("--loader.hw_decoder_load", "1.0")),
    ("DALI off the training core", ("--loader.affinity", "spare_core")),
    ("blocking CUDA syncs", ("--cuda_sync", "blocking")),
    ("bf16 channels_last batches", BF16_BATCHES),
]
