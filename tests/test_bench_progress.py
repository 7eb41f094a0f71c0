"""Every benchmark says what it is doing while it times, not only at the end.

``make bench-service`` ran bench_scaling (~90 s on 2 cores) and bench_agree (~106 s) without a
line until their tables; bench_pipeline (~54 s) and bench_train_step (~52 s) likewise.  Each now
prints a line per timed run (or per launch of ranks) as it finishes, flushed, as bench_service
and bench_shard_check do.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_module

pytestmark = pytest.mark.slow


def _lines_before_the_record(done, said: list[str]) -> None:
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    wrote = next(i for i, line in enumerate(lines) if line.startswith("wrote "))
    for text in said:
        assert any(line.startswith(text) for line in lines[:wrote]), (text, done.stdout)


def test_bench_pipeline_reports_each_run(sample_shards: Path, tmp_path: Path) -> None:
    done = run_module("bench.bench_pipeline", "--shards", str(sample_shards), "--report", str(tmp_path / "p.json"),
                      "--images", "128", "--repeat", "2", "--warmup", "1", "--configs", "gpu-check",
                      check=False, timeout=600)
    _lines_before_the_record(done, ["round 1/2 pipeline:", "round 2/2 pipeline:", "round 2/2 decode_floor:"])


def test_bench_train_step_reports_each_run(sample_shards: Path, tmp_path: Path) -> None:
    done = run_module("bench.bench_train_step", "--shards", str(sample_shards), "--report", str(tmp_path / "t.json"),
                      "--batch", "2", "--steps", "1", "--repeat", "2", check=False, timeout=600)
    _lines_before_the_record(done, ["round 1/2 model-only:", "round 2/2 loader-fed:"])


def test_bench_agree_reports_each_launch(tmp_path: Path) -> None:
    done = run_module("bench.bench_agree", "--report", str(tmp_path / "a.json"), "--ranks", "2", "--steps", "3",
                      "--rounds", "1", check=False, timeout=600)
    _lines_before_the_record(done, ["2 ranks: starting", "2 ranks: done in"])


def test_bench_scaling_reports_each_launch(sample_shards: Path, tmp_path: Path) -> None:
    done = run_module("bench.bench_scaling", "--shards", str(sample_shards), "--report", str(tmp_path / "s.json"),
                      "--global-batch", "8", check=False, timeout=600)
    _lines_before_the_record(done, ["1 rank(s): starting", "1 rank(s): done in", "2 rank(s): starting",
                                    "2 rank(s): done in"])
