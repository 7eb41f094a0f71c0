"""The sweep's order and budget on a GPU machine (``bench.sweep.plan``), without one.

What a configuration costs on a GPU is mostly compilation, and that cannot happen here, so the
child process is replaced by a table of what each configuration measured and how long it took
(the numbers are of the order seen on an H200: a first compile ~70 s, a graph from the cache
~20 s).  What is tested is the plan: which configurations run, in which order, which are skipped
when the budget cannot hold their compile, and that the recommendation is on disk as soon as the
end-to-end stage ends.  The real children run in the dry mode in ``tests/test_gpu_check.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.sweep import Sweep, plan
from bench.sweep_configs import Config

FRESH, CACHED, PIPELINE = 70.0, 20.0, 12.0
AHEAD = 90.0  # one compile among six side by side: a little slower than alone


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Scripted(Sweep):
    """A sweep whose children are a script: each configuration's rate and wall time."""

    def __init__(self, tmp: Path, seconds: float, rates: dict[str, float], broken: tuple[str, ...] = ()) -> None:
        self.fake_clock, self.rates, self.order, self.ahead, self.broken = Clock(), rates, [], [], broken
        super().__init__(tmp, tmp, seconds, dry=False, clock=self.fake_clock)

    def _compile_many(self, configs: list[Config], limit: float, first_limit: float) -> dict[str, dict]:
        """All at once (one round), each AHEAD seconds; a broken one fails at once; the first may
        go on until ``first_limit``, the others are cut off at ``limit``."""
        self.ahead = [c.name for c in configs]
        limits = {c.name: max(limit, first_limit) if i == 0 else limit for i, c in enumerate(configs)}
        self.fake_clock.now += max(min(AHEAD, limits[c.name]) for c in configs if c.name not in self.broken)
        return {c.name: {"status": "failed", "wall_seconds": 5.0, "error": "exit code 1"} if c.name in self.broken
                else {"status": "ok" if AHEAD <= limits[c.name] else "failed", "wall_seconds": min(AHEAD, limits[c.name])}
                for c in configs}

    def _child(self, config: Config, flags: tuple[str, ...], limit: float) -> dict:
        self.order.append(config.name)
        wall = PIPELINE if config.kind == "pipeline" else FRESH if config.graphs - self.compiled else CACHED
        self.fake_clock.now += min(wall, limit)
        if wall > limit:
            return {"status": "failed", "seconds": limit, "error": f"timed out after {limit:.0f} s"}
        rate = next((r for key, r in self.rates.items() if key in config.name), 10_000.0)
        record = {"status": "ok", "images_per_s": rate, "wall_seconds": wall}
        if config.kind == "train":
            record.update(data_wait_share=0.1, model_alone_images_per_s=25_000.0, ratio_to_model_alone=rate / 25_000)
        if config.eval:
            record["eval_views_per_s"] = 60_000.0
        return record


RATES = {"stream hand-over + 8 threads": 18_000.0, "stream hand-over": 16_000.0, "8 threads": 15_000.0,
         "model: compiled step + CUDA graphs": 25_000.0,
         "e2e: compiled step + CUDA graphs": 12_000.0}


def test_a_short_budget_measures_what_the_decision_needs_first(tmp_path: Path) -> None:
    # 90 s compiling six graphs ahead side by side; then 20 s each for the model, 8 end-to-end runs
    # and 6 model configurations on those graphs, 12 s each for the 7 pipeline configurations:
    # 474 s; of the 46 s left, eager (no compile) takes 20, and no new graph fits
    sweep = Scripted(tmp_path, seconds=520, rates=RATES)
    plan(sweep)
    assert sweep.ahead == ["model: compiled step + CUDA graphs", "model: step + graphs, bf16 channels_last batches",
                           "model: step + graphs, backward in the graph", "model: step + graphs, LRN window_sum",
                           "model: step + graphs, conv1 on 4 channels", "model: step + graphs, NCHW"]
    assert sweep.order[:4] == ["model: compiled step + CUDA graphs", "e2e: compiled step + CUDA graphs",
                               "e2e: compiled step + CUDA graphs + stream hand-over",
                               "e2e: compiled step + CUDA graphs + 8 threads, prefetch 4"]
    records = sweep.records
    assert all(records[n]["status"] == "ok" for n in sweep.order)
    recommended = json.loads((tmp_path / "sweep.json").read_text())["recommended"]
    assert recommended["name"] == "e2e: compiled step + CUDA graphs + stream hand-over + 8 threads, prefetch 4"
    assert recommended["images_per_s"] == 18_000.0
    # criterion 1's levers, compiled ahead, right after the end-to-end stage and before the pipeline
    # (the cuDNN lever's graph is the base model's; the bf16 one the end-to-end lever's)
    assert sweep.order[9:15] == ["model: step + graphs, backward in the graph", "model: step + graphs, LRN window_sum",
                                 "model: step + graphs, conv1 on 4 channels",
                                 "model: step + graphs, bf16 channels_last batches", "model: step + graphs, NCHW",
                                 "model: step + graphs, cuDNN tries every algorithm"]
    assert [records[n]["kind"] for n in sweep.order[15:22]] == ["pipeline"] * 7
    # a new graph does not fit in 46 s (one compile took 90 s side by side): skipped, saying so;
    # the cheaper ones after it still run
    skipped = {n: r["reason"] for n, r in records.items() if r["status"] == "skipped"}
    assert skipped["e2e: the service today (compile model, loader defaults)"] == (
        "a graph not compiled yet: needs ~90 s (measured), 46 s of the budget left")
    assert sweep.order[-1] == "model: eager" and set(skipped) == {
        "e2e: the service today (compile model, loader defaults)", "model: compiled step",
        "model: step + graphs, two towers as plain convs", "model: step + graphs, batch 256 (lr 0.02, linear rule)",
        "model: step + graphs, batch 512 (lr 0.04, linear rule)"}
    assert sweep.fake_clock.now - 1000.0 <= 520


def test_a_graph_that_fails_to_compile_ahead_is_left_to_the_budget(tmp_path: Path) -> None:
    """A compile ahead that fails (or is cut off) leaves its configuration uncompiled: it then
    costs a fresh compile when its turn comes, as without the stage; the others are not held up."""
    sweep = Scripted(tmp_path, seconds=3600, rates=RATES, broken=("model: step + graphs, NCHW",))
    plan(sweep)
    ahead = json.loads((tmp_path / "sweep.json").read_text())["compiled_ahead"]
    assert ahead["model: step + graphs, NCHW"]["status"] == "failed" and len(ahead) == 6
    assert sweep.records["model: step + graphs, NCHW"]["status"] == "ok"  # compiled in its own turn
    cached = sweep.order[9:14]
    assert "model: step + graphs, NCHW" not in cached and "model: step + graphs, cuDNN tries every algorithm" in cached


@pytest.mark.parametrize("seconds", [104, 180])
def test_a_budget_too_short_to_compile_ahead_compiles_stage_1s_model_alone(tmp_path: Path, seconds: float) -> None:
    """A budget whose 45% for compiling ahead is less than one compile (90 s guessed): six
    compiles side by side would all be cut off but the first, which then crowds stage 1 out of
    what is left (at 104 s nothing was measured but the eager model).  None is compiled ahead:
    stage 1 compiles its model alone, and the end-to-end stage runs on its graph."""
    sweep = Scripted(tmp_path, seconds=seconds, rates=RATES)
    plan(sweep)
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep.ahead == [] and "compiled_ahead" not in summary
    first = "model: compiled step + CUDA graphs"
    assert sweep.order[:2] == [first, "e2e: compiled step + CUDA graphs"]
    assert sweep.records[first] | {"status": "ok", "wall_seconds": FRESH} == sweep.records[first]
    assert summary["recommended"]["name"].startswith("e2e: compiled step + CUDA graphs")
    assert sweep.fake_clock.now - 1000.0 <= seconds


def test_a_long_budget_runs_everything_and_reruns_the_levers_on_a_faster_model(tmp_path: Path) -> None:
    # two model levers gain on their own, more together: combined, then end to end on that
    rates = {"model: step + graphs, LRN window_sum + conv1 on 4 channels": 33_000.0,
             "model: step + graphs, LRN window_sum": 30_000.0, "model: step + graphs, conv1 on 4 channels": 27_000.0,
             **RATES}
    sweep = Scripted(tmp_path, seconds=3600, rates=rates)
    plan(sweep)
    records = sweep.records
    assert [n for n, r in records.items() if r["status"] != "ok"] == []
    kinds = [records[n]["kind"] for n in sweep.order]
    first_pipeline, today = kinds.index("pipeline"), sweep.order.index(
        "e2e: the service today (compile model, loader defaults)")
    assert set(kinds[1:9]) == {"train"} and today > first_pipeline  # e2e before the rest
    combined = "step + graphs, LRN window_sum + conv1 on 4 channels"
    assert sweep.order.index(f"model: {combined}") > sweep.order.index("model: step + graphs, batch 512 (lr 0.04, "
                                                                       "linear rule)")
    rerun = [n for n in sweep.order if n.startswith(f"e2e: {combined}")]
    assert rerun == [f"e2e: {combined}", f"e2e: {combined} + stream hand-over", f"e2e: {combined} + 8 threads, prefetch 4",
                     f"e2e: {combined} + stream hand-over + 8 threads, prefetch 4"]
    assert records[rerun[0]]["flags"].count("--model.input_channels") == 1
    # each configuration ran once, and the projection uses the compiled step's evaluation rate
    assert len(sweep.order) == len(set(sweep.order))
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["projection"]["eval_views_per_s"] == 60_000.0


def test_cached_graphs_are_told_from_new_ones() -> None:
    from bench.sweep_configs import BF16_BATCHES, MODEL

    graphs, step = MODEL[0], MODEL[1]
    lever = Config("e2e", "train", (*graphs.flags, "--loader.handover", "stream", "--loader.threads", "8"), 60)
    bf16 = Config("e2e bf16", "train", (*graphs.flags, *BF16_BATCHES), 60)
    cudnn = next(c for c in MODEL if "cuDNN" in c.name)
    assert lever.graphs <= graphs.graphs and cudnn.graphs <= graphs.graphs
    assert bf16.graphs - graphs.graphs and step.graphs - graphs.graphs
    assert Config("pipeline", "pipeline", graphs.flags, 60).graphs == frozenset()


def test_the_recommendation_as_config_lines_is_the_configuration_measured(sample_shards: Path, tmp_path: Path) -> None:
    """OUT/recommended.toml, loaded as a config file, gives the service exactly the configuration
    the flags gave it (typed by the service's parser: numbers, booleans, top-level keys first)."""
    from bench.sweep_toml import write_recommendation
    from service.app import parse

    flags = ["--model.autocast", "bfloat16", "--model.channels_last", "true", "--loader.batch_size", "128",
             "--model.compile", "step", "--model.input_channels", "4", "--cuda_sync", "blocking",
             "--loader.hw_decoder_load", "1.0", "--loader.handover", "stream"]
    summary = {"mode": "gpu", "started": "now", "recommended": {
        "name": "e2e: x", "flags": flags, "images_per_s": 20_000.0, "data_wait_share": 0.03, "ratio_to_model_alone": 0.95}}
    path = write_recommendation(tmp_path, summary, sample_shards)
    text = path.read_text()
    assert "20000 images/s, data wait 3.0%, 0.95x the same step alone" in text
    assert text.index('cuda_sync = "blocking"') < text.index("[model]") and "input_channels = 4" in text
    assert parse(["--config", str(path), "--shards", str(sample_shards)]) == parse(["--shards", str(sample_shards),
                                                                                   *flags])
    assert write_recommendation(tmp_path, {"mode": "gpu", "started": "now"}, sample_shards) is None
