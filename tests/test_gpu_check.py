"""``make gpu-check``'s dry mode (what runs where there is no GPU): every part starts, the CUDA-only
parts skip with a reason, a failing part is recorded and does not stop the others, and the
JSON is always written (exit 0)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

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
                      "roi-probe": "skipped"}
    assert all(parts[n]["reason"] for n in PARTS if status[n] == "skipped")
    assert "tests collected" in parts["gpu-tests"]["results"]["collected"]
    assert parts["data"]["results"]["train"] == 16 and parts["data"]["results"]["val"] == 4
    assert parts["service"]["results"]["epochs"][0]["images_per_s"] > 0
    check_sweep(tmp_path / "out", parts, record)
    check_service_after_the_sweep(tmp_path, record)
    assert (tmp_path / "out" / "model.json").is_file() and (tmp_path / "out" / "logs" / "service.log").is_file()
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


@pytest.mark.slow
def test_a_failing_part_is_recorded_and_the_rest_still_runs(tmp_path: Path) -> None:
    """An unreadable image in the generated dataset: sharding fails (too many skipped), the
    parts that need the shards skip saying so, the others run, and the JSON is written."""
    junk = tmp_path / "data" / "dry" / "sample" / "train" / "n90000000" / "broken.JPEG"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"")
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
    killed while writing its table, chart and recommendation, it would leave its own children,
    each in a session of its own, running on the GPU into the next part."""
    import time

    from bench.gpu_check_parts import PARTS, SERVICE_RESERVE, Context, sweep_commands

    ctx = Context(tmp_path, tmp_path, dry=False, deadline=time.time() + seconds, only=only)
    command = sweep_commands(ctx)[0]
    budget = float(command[command.index("--seconds") + 1])
    cap = next(p for p in PARTS if p.name == "sweep").cap
    assert 30 <= budget <= 420 and min(cap, seconds) - budget >= 40  # the part's limit, less the budget
    if "service" in only:  # and the service part still has its time after the report
        assert seconds - budget - SERVICE_RESERVE >= 40
