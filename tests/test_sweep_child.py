"""``bench.sweep_child``, one configuration of the sweep in its own process: the end-to-end
measurement survives its profile (the profiler on CUDA graphs has crashed processes), whether
the profile raises or the process dies in it, and the sweep records which it was."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.child import ROOT, child_env
from bench.sweep import child_record
from bench.sweep_configs import DRY


def spec(shards: Path, trace: Path, profile_steps: int) -> str:
    return json.dumps({"name": "e2e: profiled", "kind": "train", "flags": list(DRY), "shards": str(shards),
                       "warmup": 1, "steps": 3, "eval_batches": 0, "profile_steps": profile_steps,
                       "trace": str(trace)})


@pytest.mark.slow
def test_a_profile_that_fails_costs_the_profile_alone(sample_shards: Path, tmp_path: Path) -> None:
    """The trace cannot be written (its folder is missing): the record is ok, with its rates and
    the profile's error."""
    result = tmp_path / "result.json"
    out = subprocess.run([sys.executable, "-m", "bench.sweep_child", spec(sample_shards, tmp_path / "gone" / "t.json.gz", 2),
                          str(result)], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(result.read_text())
    assert record["status"] == "ok" and record["images_per_s"] > 0 and record["model_alone_images_per_s"] > 0
    assert "profile" not in record and "t.json" in record["profile_error"]


@pytest.mark.slow
def test_a_process_that_dies_in_its_profile_leaves_its_measurement(sample_shards: Path, tmp_path: Path) -> None:
    """Killed while profiling (a native crash, the configuration's time limit): the measurement was
    written, whole, before the profile started, and the sweep records the profile as lost."""
    result, log = tmp_path / "result.json", tmp_path / "child.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bench.sweep_child",
                                 spec(sample_shards, tmp_path / "t.json.gz", 100_000), str(result)],
                                cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not result.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert proc.poll() is None, log.read_text()[-2000:]  # still running: in the profile
        finally:
            proc.kill()
            proc.wait()
    record = child_record(result, -signal.SIGKILL, 60, log.read_text(), 999.0, profiled=True)
    assert record["status"] == "ok" and record["images_per_s"] > 0 and record["ratio_to_model_alone"] > 0
    assert "profile" not in record and "SIGKILL" in record["profile_error"] and "teardown" not in record
    assert record["wall_seconds"] == record["seconds"] < 999  # the measurement's time, not the hang's


def test_what_a_child_left_is_recorded_as_what_it_was(tmp_path: Path) -> None:
    """No result file: failed.  A result and exit 0: its wall time.  A result and a failure after
    it: the profile lost (a profiled configuration without one) or the teardown."""
    result = tmp_path / "r.json"
    assert child_record(result, 1, 60, "Traceback ...\nValueError: bad flag", 5.0, False)["status"] == "failed"
    result.write_text(json.dumps({"status": "ok", "images_per_s": 10.0, "seconds": 12.0}))
    expected = {"status": "ok", "images_per_s": 10.0, "seconds": 12.0, "wall_seconds": 14.0}
    assert child_record(result, 0, 60, "", 14.0, True) == expected
    hung = child_record(result, None, 60, "", 75.0, False)
    assert "teardown" in hung and "profile_error" not in hung and hung["wall_seconds"] == 12.0
    result.write_text(json.dumps({"status": "ok", "images_per_s": 10.0, "seconds": 12.0, "profile": {}}))
    assert "teardown" in child_record(result, None, 60, "", 75.0, True)  # profiled, then hung in the teardown
