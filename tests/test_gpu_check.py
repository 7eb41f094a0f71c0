"""``make gpu-check``'s dry mode (what runs where there is no GPU): every part starts, the CUDA-only
parts skip with a reason, a failing part is recorded and does not stop the others, and the
JSON is always written (exit 0; stopped by a signal, exit 128 + the signal, the JSON written all
the same).  Stopping it, and its children never outliving it: ``tests/test_gpu_check_stop.py``."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from bench.child import slug
from sampledata.generate import SampleConfig, generate
from tests.conftest import run_module

PARTS = ["versions", "nvidia-smi", "data", "gpu-tests", "bench-model", "bench-pipeline", "sweep", "service",
         "roi-probe"]


def dry_run(tmp_path: Path) -> tuple[dict, str]:
    out = tmp_path / "out"
    result = run_module("bench.gpu_check", "--dry", "--out", str(out), "--data", str(tmp_path / "data"),
                        "--seconds", "1200", timeout=1500)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((out / "gpu_check.json").read_text()), result.stdout


@pytest.mark.slow
def test_dry_mode_runs_every_part(tmp_path: Path) -> None:
    record, stdout = dry_run(tmp_path)
    parts = record["parts"]
    assert record["mode"] == "dry" and list(parts) == PARTS
    status = {name: parts[name]["status"] for name in PARTS}
    assert status == {"versions": "ok", "nvidia-smi": "skipped", "data": "ok", "gpu-tests": "skipped",
                      "bench-model": "ok", "bench-pipeline": "ok", "sweep": "ok", "service": "ok",
                      "roi-probe": "skipped"}, {n: r.get("error") for n, r in parts.items() if "error" in r}
    assert all(parts[n]["reason"] for n in PARTS if status[n] == "skipped")
    assert "tests collected" in parts["gpu-tests"]["results"]["collected"]
    assert parts["data"]["results"]["train"] == 16 and parts["data"]["results"]["val"] == 4
    assert parts["service"]["results"]["epochs"][0]["images_per_s"] > 0
    check_sweep(tmp_path / "out", parts, record)
    check_service_after_the_sweep(tmp_path, record)
    assert (tmp_path / "out" / "model.json").is_file() and (tmp_path / "out" / "logs" / "service.log").is_file()
    # the service run's record comes back with the results (its checkpoints stay with the data)
    kept = {p.name for p in (tmp_path / "out" / "service").iterdir()}
    assert {"history.json", "log.jsonl", "curve.png"} <= kept and not any(k.endswith(".pt") for k in kept)
    for name in PARTS:  # the summary table
        assert f"\n{name} " in stdout


def check_sweep(out: Path, parts: dict, record: dict) -> None:
    """The sweep part: every stage ran (compiling configurations skipped in the dry mode), a
    profile summary, a recommendation the service part then ran with, and the projection."""
    sweep = json.loads((out / "sweep.json").read_text())
    configs = sweep["configs"]
    kinds = {r["kind"] for r in configs.values() if r["status"] == "ok"}
    assert kinds == {"model", "pipeline", "train"} and (out / "sweep.png").is_file()
    assert all(r["status"] == "skipped" and "compiling" in r["reason"] for r in configs.values()
               if "--model.compile" in r["flags"] and r["flags"][r["flags"].index("--model.compile") + 1] != "off")
    profiled = [r for r in configs.values() if r.get("profile")]
    assert profiled and profiled[0]["profile"]["window_ms"] > 0 and profiled[0]["profile"]["steps"] == 2
    assert all(r["ratio_to_model_alone"] > 0 and 0 <= r["data_wait_share"] < 1
               for r in configs.values() if r["kind"] == "train" and r["status"] == "ok")
    recommended = sweep["recommended"]
    assert parts["service"]["results"]["flags"] == recommended["flags"]
    assert recommended["name"] in (out / "recommended.toml").read_text()
    criterion = parts["service"]["results"]["criterion_2"]
    assert criterion["model_alone_images_per_s"] == recommended["model_alone_images_per_s"] > 0
    assert criterion["met"] in (True, False)
    projection = record["projection"]
    assert projection["includes_evaluation"] and projection["total_hours"] > projection["train_hours"] > 0
    assert projection["eval_rate_from"] == "sweep" and projection["service_eval_views_per_s"] == parts[
        "service"]["results"]["epochs"][-1]["eval_views_per_s"] > 0
    # each configuration's record and the profiled one's whole trace come back with the summary
    files = {p.name for p in (out / "sweep").iterdir()}
    assert {f"{slug(name)}.json" for name, r in configs.items() if r["status"] == "ok"} <= files
    assert any(f.endswith("-trace.json.gz") for f in files)


def check_service_after_the_sweep(tmp_path: Path, first: dict) -> None:
    """A second run of the service part alone (a GPU lent call by call: the sweep in one, the
    service in the next) runs the first run's recommendation on its shards, with its projection."""
    out = tmp_path / "out"
    result = run_module("bench.gpu_check", "--dry", "--out", str(out), "--data", str(tmp_path / "data"),
                        "--seconds", "600", "--parts", "service", timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "gpu_check.json").read_text())
    parts, recommended = record["parts"], json.loads((out / "sweep.json").read_text())["recommended"]
    assert "runs the recommendation of the sweep" in result.stdout
    assert parts["service"]["status"] == "ok" and parts["service"]["results"]["flags"] == recommended["flags"]
    assert parts["data"]["status"] == "skipped" and "results of the sweep" in parts["sweep"]["reason"]
    assert record["projection"]["includes_evaluation"]
    assert record["projection"]["eval_views_per_s"] == first["projection"]["eval_views_per_s"]


def test_a_sweep_configuration_that_fails_is_recorded_and_the_next_runs(sample_shards: Path, tmp_path: Path) -> None:
    from bench.sweep import Config, Sweep

    sweep = Sweep(sample_shards, tmp_path, seconds=300, dry=True)
    bad = sweep.run(Config("pipeline: a setting that does not exist", "pipeline", ("--loader.warp", "9"), 60))
    good = sweep.run(Config("pipeline: defaults", "pipeline", (), 120))
    assert bad["status"] == "failed" and "unknown key 'loader.warp'" in bad["error"]
    assert good["status"] == "ok" and good["images_per_s"] > 0
    assert list(json.loads((tmp_path / "sweep.json").read_text())["configs"]) == [bad["name"], good["name"]]


def test_an_earlier_runs_sweep_summary_is_never_taken_for_this_runs(tmp_path: Path) -> None:
    """A sweep that died before writing anything leaves the last run's sweep.json in OUT: read
    after the failure (``Part.salvage``), it must not pass for this run's results."""
    from bench.gpu_check_parts import Context, sweep_read

    old = {"mode": "gpu", "started": "2026-01-01T00:00:00+0000", "configs": {}, "recommended": {"flags": ["-x"]}}
    (tmp_path / "sweep.json").write_text(json.dumps(old))
    ctx = Context(tmp_path, tmp_path, dry=False, deadline=time.time() + 60)
    with pytest.raises(RuntimeError, match="earlier sweep"):
        sweep_read(ctx, "")
    assert ctx.service_flags == ()
    fresh = {**old, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "configs": {"e2e": {"status": "ok"}}}
    (tmp_path / "sweep.json").write_text(json.dumps(fresh))
    assert sweep_read(ctx, "")["recommended"] == {"flags": ["-x"]} and ctx.service_flags == ("-x",)
    nothing = {**fresh, "configs": {"e2e": {"status": "failed"}, "model": {"status": "skipped"}}}
    (tmp_path / "sweep.json").write_text(json.dumps(nothing))
    with pytest.raises(RuntimeError, match=r"no configuration was measured \(1 failed, 1 skipped\)"):
        sweep_read(ctx, "")


@pytest.mark.slow
def test_a_failing_part_is_recorded_and_the_rest_still_runs(tmp_path: Path) -> None:
    """An unreadable image in the generated dataset: sharding fails (too many skipped), the
    parts that need the shards skip saying so, the others run, and the JSON is written.  The
    dataset is the data part's own (its settings in dry mode), written first: sampledata refuses
    to write into a folder that holds other images."""
    sample = tmp_path / "data" / "dry" / "sample"
    generate(SampleConfig(out=sample, classes=2, train_per_class=8, val_per_class=2, workers=1))
    (sample / "train" / "n90000000" / "broken.JPEG").write_bytes(b"")
    record, _ = dry_run(tmp_path)
    parts = record["parts"]
    assert parts["data"]["status"] == "failed" and "exit code 1" in parts["data"]["error"]
    assert "skipped" in parts["data"]["error"]  # the sharder's own message is in the error
    for name in ("bench-pipeline", "service", "roi-probe"):
        assert parts[name]["status"] == "skipped" and "data part" in parts[name]["reason"]
    assert parts["bench-model"]["status"] == "ok" and parts["versions"]["status"] == "ok"


@pytest.mark.parametrize("seconds, only", [(1000, ("sweep",)), (300, ("sweep",)), (600, ("sweep", "service"))])
def test_the_sweep_part_outlives_its_budget_by_its_report(tmp_path: Path, seconds: float, only: tuple) -> None:
    """The sweep's budget ends at least 40 s before gpu-check would kill it (its part's limit):
    killed while writing its table, chart and recommendation, it would lose them."""

    from bench.gpu_check_parts import PARTS, SERVICE_RESERVE, Context, sweep_commands

    ctx = Context(tmp_path, tmp_path, dry=False, deadline=time.time() + seconds, only=only)
    command = sweep_commands(ctx)[0]
    budget = float(command[command.index("--seconds") + 1])
    cap = next(p for p in PARTS if p.name == "sweep").cap
    assert 30 <= budget <= 420 and min(cap, seconds) - budget >= 40  # the part's limit, less the budget
    if "service" in only:  # and the service part still has its time after the report
        assert seconds - budget - SERVICE_RESERVE >= 40


def test_the_data_part_leaves_cores_to_the_gpu_tests_beside_it(tmp_path: Path) -> None:
    """On a GPU machine the data part (every image written by a process of its own) runs side by
    side with the GPU tests, one of which times ``next(loader)``: it must not take every core."""
    from bench.gpu_check_parts import CORES_FOR_GPU_TESTS, SIDE_BY_SIDE, Context, data_commands

    assert SIDE_BY_SIDE["data"] == "gpu-tests"
    cores = len(os.sched_getaffinity(0))
    for command in data_commands(Context(tmp_path, tmp_path, dry=False, deadline=time.time() + 60)):
        workers = int(command[command.index("--workers") + 1])
        assert 1 <= workers == max(1, cores - CORES_FOR_GPU_TESTS), command


def test_a_part_beside_another_has_the_budget_left_from_its_own_start(tmp_path: Path) -> None:
    """The GPU tests run beside the data part and are waited for once it ends.  Their limit was
    taken then (the budget left at that moment) and counted from their start: they were killed
    early by the data part's whole run time (here at 6 s of the 10 s left, while needing 7)."""
    from bench.gpu_check import finish, start
    from bench.gpu_check_parts import Context, Part

    part = Part("beside", 100, lambda ctx: [["sleep", "7"]])
    ctx = Context(tmp_path, tmp_path, dry=True, deadline=time.time() + 10)
    (tmp_path / "logs").mkdir()
    proc, log = start(part, ctx)
    time.sleep(4)  # the part beside it ran this long
    finish(part, ctx, proc, log)
    assert part.record["status"] == "ok", part.record


def test_gpu_tests_cut_off_or_crashed_still_say_test_by_test_what_ran(tmp_path: Path) -> None:
    """pytest writes its junit report only as it exits: killed at the part's limit, or dead in a
    CUDA or DALI call, it left nothing, and every GPU test's result was lost.  The log says each
    test as it ends (-v), and the one it was in when it stopped; a module that cannot be imported
    here (a wheel missing on a bare machine) costs its own tests, not all of them."""
    from bench.gpu_check_parts import Context, gpu_test_commands, gpu_test_read

    ctx = Context(tmp_path, tmp_path, dry=False, deadline=time.time() + 60)
    (tmp_path / "gpu_tests.xml").write_text("<testsuites/>")  # an earlier run's
    chain = gpu_test_commands(ctx)
    assert chain[0][:2] == ["rm", "-f"] and Path(chain[0][2]) == tmp_path / "gpu_tests.xml"
    assert "-v" in chain[-1] and "--continue-on-collection-errors" in chain[-1]
    (tmp_path / "gpu_tests.xml").unlink()  # as the chain's first command does
    log = ("tests/test_gpu_paths.py::test_a PASSED [ 20%]\n"
           "tests/test_gpu_paths.py::test_b FAILED [ 40%]\n"
           "tests/test_gpu_paths.py::test_c SKIPPED (no second GPU) [ 60%]\n"
           "tests/test_gpu_speed.py::test_d ")
    assert gpu_test_read(ctx, log) == {
        "passed": ["test_gpu_paths::test_a"], "failed": {"test_gpu_paths::test_b": "see logs/gpu-tests.log"},
        "skipped": {"test_gpu_paths::test_c": "(no second GPU)"}, "stopped_in": "test_gpu_speed::test_d",
        "incomplete": "pytest ended before its report: each test's result as its log said it"}
