"""``bench.sweep_child``, one configuration of the sweep in its own process: the end-to-end
measurement survives its profile (the profiler on CUDA graphs has crashed processes), whether
the profile raises or the process dies in it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.child import ROOT, child_env
from bench.sweep_configs import DRY


def spec(shards: Path, trace: Path, profile_steps: int) -> str:
    return json.dumps({"name": "e2e: profiled", "kind": "train", "flags": list(DRY), "shards": str(shards),
                       "warmup": 1, "steps": 3, "eval_batches": 0, "profile_steps": profile_steps,
                       "trace": str(trace)})


def test_a_profile_that_fails_costs_the_profile_alone(sample_shards: Path, tmp_path: Path) -> None:
    """The trace cannot be written (its folder is missing): the record is ok, with its rates and
    the profile's error."""
    result = tmp_path / "result.json"
    out = subprocess.run([sys.executable, "-m", "bench.sweep_child", spec(sample_shards, tmp_path / "gone" / "t.json.gz", 2),
                          str(result)], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(result.read_text())
    assert record["status"] == "ok" and record["images_per_s"] > 0 and record["model_alone_images_per_s"] > 0
    assert "profile" not in record and record["profile_error"].startswith("FileNotFoundError")


def test_a_process_that_dies_in_its_profile_leaves_its_measurement(sample_shards: Path, tmp_path: Path) -> None:
    """Killed while profiling (a native crash, the configuration's time limit): the measurement was
    written, whole, before the profile started."""
    result = tmp_path / "result.json"
    proc = subprocess.Popen([sys.executable, "-m", "bench.sweep_child", spec(sample_shards, tmp_path / "t.json.gz",
                                                                               100_000), str(result)],
                            cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not result.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-2000:]  # still running: in the profile
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    record = json.loads(result.read_text())
    assert record["status"] == "ok" and record["images_per_s"] > 0 and record["ratio_to_model_alone"] > 0
    assert "profile" not in record and "profile_error" not in record
