"""``make gpu-check``'s dry mode (what runs where there is no GPU): every part starts, the CUDA-only
parts skip with a reason, a failing part is recorded and does not stop the others, and the
JSON is always written (exit 0)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_module

PARTS = ["versions", "nvidia-smi", "data", "gpu-tests", "bench-model", "bench-pipeline", "service", "roi-probe"]


def dry_run(tmp_path: Path) -> tuple[dict, str]:
    out = tmp_path / "out"
    result = run_module("bench.gpu_check", "--dry", "--out", str(out), "--data", str(tmp_path / "data"),
                        "--seconds", "400", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((out / "gpu_check.json").read_text()), result.stdout


@pytest.mark.slow
def test_dry_mode_runs_every_part(tmp_path: Path) -> None:
    record, stdout = dry_run(tmp_path)
    parts = record["parts"]
    assert record["mode"] == "dry" and list(parts) == PARTS
    status = {name: parts[name]["status"] for name in PARTS}
    assert status == {"versions": "ok", "nvidia-smi": "skipped", "data": "ok", "gpu-tests": "skipped",
                      "bench-model": "ok", "bench-pipeline": "ok", "service": "ok", "roi-probe": "skipped"}
    assert all(parts[n]["reason"] for n in PARTS if status[n] == "skipped")
    assert "tests collected" in parts["gpu-tests"]["results"]["collected"]
    assert parts["data"]["results"]["train"] == 16 and parts["data"]["results"]["val"] == 4
    assert parts["service"]["results"]["epochs"][0]["images_per_s"] > 0
    assert (tmp_path / "out" / "model.json").is_file() and (tmp_path / "out" / "logs" / "service.log").is_file()
    for name in PARTS:  # the summary table
        assert f"\n{name} " in stdout


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
