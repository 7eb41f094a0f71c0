"""The service's speed settings (issue 13): the new keys are validated naming the key, and a run
with ``model.compile step`` trains and evaluates with one compilation of each (no recompile for
the epochs' short last batches, the evaluations between epochs, or the lr schedule)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from model.step import BACKWARD_IN_GRAPH
from service.app import parse, run_service
from service.errors import ServiceError
from tests.service_proc import TINY


@pytest.mark.parametrize("args, message", [
    (["--model.compile", "true"], "model.compile must be one of \\['off', 'model', 'step'\\]"),
    (["--model.compile", "step", "--model.autocast", "float16"],
     "model.compile step does not take model.autocast float16"),
    (["--model.compile_mode", "fast"], "model.compile_mode must be one of"),
    (["--model.trace_backward", "yes"], "model.trace_backward must be one of"),
    (["--model.compile", "model", "--model.trace_backward", "on"], "model.trace_backward on needs model.compile step"),
    (["--model.lrn", "fused"], "model.lrn must be one of"),
    (["--model.cudnn_benchmark_limit", "-1"], "model.cudnn_benchmark_limit must be >= 0"),
    (["--loader.memory_format", "channels_last"], "loader.memory_format channels_last needs model.channels_last true"),
    (["--loader.handover", "dali"], "loader.handover must be one of"),
    (["--loader.affinity", "all"], "loader.affinity must be one of"),
    (["--loader.hw_decoder_load", "1.5"], "loader.hw_decoder_load must be in \\[0, 1\\]"),
    (["--cuda_sync", "sleep"], "cuda_sync must be one of"),
])
def test_speed_settings_are_checked_naming_the_key(args: list[str], message: str) -> None:
    with pytest.raises(ServiceError, match=message) as info:
        parse(args)
    assert info.value.code == 2


def test_speed_settings_that_fit_together_pass() -> None:
    cfg = parse(["--model.compile", "step", "--model.compile_mode", "reduce-overhead", "--model.lrn", "window_sum",
                 "--model.channels_last", "true", "--model.autocast", "bfloat16", "--loader.dtype", "bfloat16",
                 "--loader.memory_format", "channels_last", "--loader.handover", "stream", "--cuda_sync", "blocking",
                 "--loader.affinity", "spare_core", "--loader.jpeg_fancy_upsampling", "false",
                 "--model.trace_backward", "on"])
    assert (cfg.model.compile, cfg.loader.handover, cfg.cuda_sync) == ("step", "stream", "blocking")
    assert cfg.model.trace_backward == "on"


@pytest.mark.slow
def test_compiled_step_service_compiles_each_function_once(sample_shards: Path, tmp_path: Path) -> None:
    """Two epochs at batch 32 over 144 images (4 steps of 32 and one of 16 per epoch) with an
    evaluation after each, in this process so Dynamo's counters can be read: two graphs (the
    step and the evaluation forward; three on torch < 2.13, whose step breaks at ``backward()``,
    model.step's BACKWARD_IN_GRAPH), and a recompilation would stop the run with an error."""
    args = [*TINY, "--loader.batch_size", "32", "--epochs", "2", "--model.compile", "step",
            "--shards", str(sample_shards), "--out", str(tmp_path / "run"), "--checkpoint.every_seconds", "0"]
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert run_service(parse(args)) == 0
    assert counters["stats"]["unique_graphs"] == (2 if BACKWARD_IN_GRAPH else 3)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["train_loss"] > 0 and 0 <= h["top1_error"] <= 1 for h in history)
