"""The benchmarks refuse a bad shard directory in one line before they time anything.

``make bench-pipeline SHARDS=...`` and ``make bench-service SHARDS=...`` pass any directory on;
a missing one, or one that holds no shards, was a traceback (bench_pipeline, bench_train_step,
bench_scaling) or, for bench_service, a traceback only after its whole timed run (minutes).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_module

# Each benchmark that reads shards, with arguments that keep it short should it start timing.
BENCHES = {
    "bench.bench_pipeline": ["--images", "128", "--repeat", "1", "--warmup", "1"],
    "bench.bench_train_step": ["--batch", "2", "--steps", "1", "--repeat", "1"],
    "bench.bench_service": ["--batch", "4", "--steps", "2", "--rounds", "1", "--log-every", "1",
                            "--ckpt-every", "1", "--null-steps", "10"],
    "bench.bench_scaling": ["--global-batch", "4"],
}


def _not_shards(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "no-such-dir"
    images = tmp_path / "images"
    (images / "train" / "n01440764").mkdir(parents=True)
    (images / "notes.txt").write_text("not a shard directory\n")
    return images


@pytest.mark.parametrize("kind", ["missing", "not-shards"])
@pytest.mark.parametrize("module", list(BENCHES))
def test_a_bad_shard_directory_is_one_line_before_any_timing(module: str, kind: str, tmp_path: Path) -> None:
    shards = _not_shards(tmp_path, kind)
    report = tmp_path / "out" / "report.json"
    done = run_module(module, "--shards", str(shards), "--report", str(report), *BENCHES[module],
                      check=False, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[0].startswith(module.split(".")[1] + ": ") and str(shards) in lines[0], lines
    assert "make shards" in lines[0], lines  # says what to do
    assert "round" not in done.stdout and not report.exists(), done.stdout  # nothing was timed or written


@pytest.mark.slow  # a fresh interpreter with torch per case: 3-6 s each on 2 busy cores
@pytest.mark.parametrize("module, args, said", [
    ("bench.bench_shards", ["--scan-images", "0"], "argument --scan-images: must be at least 1, got 0"),
    ("bench.bench_model", ["--batch", "0"], "argument --batch: must be at least 1, got 0"),
    ("bench.bench_model", ["--iters", "0"], "argument --iters: must be at least 1, got 0"),
    ("bench.bench_pipeline", ["--images", "0"], "argument --images: must be at least 1, got 0"),
    ("bench.bench_train_step", ["--repeat", "0"], "argument --repeat: must be at least 1, got 0"),
    ("bench.bench_shard_check", ["--megabytes", "0"], "argument --megabytes: must be at least 1, got 0"),
    ("bench.bench_service", ["--steps", "2", "--ckpt-every", "6"],
     "--ckpt-every 6 must be less than --steps 2 (every timed run must write a checkpoint)"),
], ids=["shards scan 0", "model batch 0", "model iters 0", "pipeline images 0", "train_step repeat 0",
        "shard_check megabytes 0", "service no checkpoint per run"])
def test_a_count_that_measures_nothing_is_refused_in_one_line(sample_shards, tmp_path, module, args, said):
    """``--batch 0`` timed nothing and reported 0 images/s (exit 0), ``--iters 0`` a
    ZeroDivisionError as the configuration's result (exit 0), ``--repeat 0`` or ``--scan-images 0``
    a traceback; bench_service with ``--ckpt-every`` not below ``--steps`` timed every round and
    then failed with an IndexError (no checkpoint to measure)."""
    report = tmp_path / "report.json"
    short = {"bench.bench_model": ["--layouts", "grouped", "--warmup", "1", "--iters", "1", "--batch", "2"],
             "bench.bench_pipeline": ["--shards", str(sample_shards), "--repeat", "1", "--warmup", "1"],
             "bench.bench_train_step": ["--shards", str(sample_shards), "--batch", "2", "--steps", "1"],
             "bench.bench_shard_check": ["--rounds", "1", "--steps", "1", "--batch", "2"],
             "bench.bench_service": ["--batch", "8", "--rounds", "1", "--log-every", "1", "--null-steps", "10"],
             "bench.bench_shards": ["--src", str(tmp_path / "none"), "--repeat", "1"]}[module]
    done = run_module(module, "--report", str(report), *short, *args, check=False, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert said in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
    assert not report.exists()


@pytest.mark.slow  # a fresh interpreter with torch per case: 3-6 s each on 2 busy cores
@pytest.mark.parametrize("where", ["under a file", "a directory", "in /proc"])
@pytest.mark.parametrize("module", ["bench.bench_model", "bench.bench_train_step", "bench.bench_pipeline"])
def test_a_report_that_cannot_be_written_is_refused_before_the_run(sample_shards, tmp_path, module, where):
    """``--report`` under a file, naming a directory, or where no directory can be made was found
    out after the whole timed run, as a FileExistsError/IsADirectoryError/FileNotFoundError
    traceback, the measurement lost."""
    (tmp_path / "afile").write_text("")
    report = {"under a file": tmp_path / "afile" / "r.json", "a directory": tmp_path,
              "in /proc": Path("/proc/no-such-dir/r.json")}[where]  # /proc: even root cannot make it
    short = {"bench.bench_model": ["--layouts", "grouped", "--warmup", "1", "--iters", "1", "--batch", "2"],
             "bench.bench_train_step": ["--shards", str(sample_shards), "--batch", "2", "--steps", "1", "--repeat", "1"],
             "bench.bench_pipeline": ["--shards", str(sample_shards), "--images", "128", "--repeat", "1",
                                      "--warmup", "1", "--configs", "gpu-check"]}[module]
    done = run_module(module, "--report", str(report), *short, check=False, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert f"argument --report: cannot write {report}" in last, done.stderr[-2000:]
    assert done.stdout == "", done.stdout  # refused before anything ran


@pytest.mark.parametrize("kind", ["missing", "no layout"])
def test_bench_shards_names_a_bad_source_before_any_timing(tmp_path: Path, kind: str) -> None:
    """``bench.bench_shards --src`` naming no directory, or one with no ImageNet layout, ended in the
    sharder's LayoutError as a traceback (after the bare loop had run over no files)."""
    src = tmp_path / "none" if kind == "missing" else tmp_path
    report = tmp_path / "out" / "shards.json"
    done = run_module("bench.bench_shards", "--src", str(src), "--report", str(report), "--repeat", "1",
                      "--scan-images", "10", check=False, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    first = done.stderr.strip().splitlines()[0]
    assert first.startswith("bench_shards: ") and str(src) in first, done.stderr
    assert done.stdout == "" and not report.exists()


@pytest.mark.slow  # a fresh interpreter with torch per case: 3-6 s each on 2 busy cores
@pytest.mark.parametrize("device, said", [
    ("cuda:99", "argument --device: cuda:99: "),
    ("gpu", "argument --device: must be cpu, cuda or cuda:N, got 'gpu'"),
], ids=["a cuda device not here", "no device name"])
@pytest.mark.parametrize("module", ["bench.bench_model", "bench.bench_service", "bench.bench_shard_check",
                                    "bench.bench_train_step"])
def test_a_device_that_is_not_here_is_one_line(tmp_path: Path, module: str, device: str, said: str) -> None:
    """``--device cuda`` on a machine without one (or ``cuda:99``, or a name torch does not know)
    was torch's traceback ("Torch not compiled with CUDA enabled", "Invalid device string")."""
    report = tmp_path / "r.json"
    done = run_module(module, "--device", device, "--report", str(report), check=False, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert said in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
    assert "use --device cpu" in done.stderr.strip().splitlines()[-1]
    assert not report.exists()


@pytest.mark.parametrize("module", ["bench.bench_shards", "bench.bench_pipeline"])
def test_help_gives_the_benchmark_s_first_paragraph_whole(module: str) -> None:
    """bench_shards' --help stopped mid-sentence ("... and the projection for ImageNet at 8,
    32 and 64 cores" cut after its first line); each benchmark says its first paragraph."""
    said = " ".join(run_module(module, "--help", timeout=120).stdout.split())
    first = " ".join(__import__(module, fromlist=["_"]).__doc__.split("\n\n")[0].split())
    assert first in said, said


@pytest.mark.slow  # ~60 training steps of AlexNet and 2 checkpoints (0.5 GB each) on the CPU
def test_bench_service_runs_at_a_small_batch(tmp_path: Path) -> None:
    """``bench.bench_service --batch 2`` trained its four random batches at the paper's lr 0.01,
    which diverged by the 12th step: the service loop's divergence check ended the benchmark in a
    ``Diverged`` traceback during its warm-up.  The lr is now the paper's scaled to the batch."""
    report = tmp_path / "out" / "service.json"
    done = run_module("bench.bench_service", "--batch", "2", "--steps", "7", "--ckpt-every", "6", "--rounds", "1",
                      "--log-every", "1", "--null-steps", "10", "--report", str(report), "--tmp", str(tmp_path),
                      check=False, timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    record = json.loads(report.read_text())
    assert (record["batch"], record["lr"]) == (2, 0.01 * 2 / 128)
    assert "batch 2, lr 0.00015625" in done.stdout, done.stdout


@pytest.mark.slow  # 15 training steps of AlexNet at batch 2 on the CPU
def test_bench_model_runs_at_a_small_batch(tmp_path: Path) -> None:
    """``bench.bench_model --batch 2`` stepped its one synthetic batch at the paper's lr 0.01,
    which diverged within a dozen steps: the configuration was reported as failed ("non-finite
    loss nan"), with no number.  The lr is the paper's scaled to the batch, and the record says it."""
    report = tmp_path / "model.json"
    done = run_module("bench.bench_model", "--layouts", "grouped", "--warmup", "12", "--iters", "3", "--batch", "2",
                      "--report", str(report), check=False, timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    record = json.loads(report.read_text())
    assert [r["error"] for r in record["results"]] == [None], record["results"]
    assert (record["batch"], record["lr"]) == (2, 0.01 * 2 / 128)
    assert "batch 2, lr 0.00015625" in done.stdout, done.stdout


@pytest.mark.slow  # 20 training steps of AlexNet at batch 2 on the CPU, and a few seconds of hashing
def test_bench_shard_check_trains_at_a_small_batch_without_diverging(tmp_path: Path) -> None:
    """``bench.bench_shard_check --batch 2`` trained at the paper's lr 0.01 and went nan by the 9th
    step, with no check: every later step timed was arithmetic on nan weights.  The lr is the
    paper's scaled to the batch, the record says it and the last loss, which is finite."""
    report = tmp_path / "shard_check.json"
    done = run_module("bench.bench_shard_check", "--batch", "2", "--steps", "5", "--rounds", "1", "--megabytes", "1",
                      "--report", str(report), check=False, timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    record = json.loads(report.read_text())
    assert (record["batch"], record.get("lr")) == (2, 0.01 * 2 / 128)
    assert math.isfinite(record["last_loss"]), record["last_loss"]
    assert "batch 2, lr 0.00015625" in done.stdout, done.stdout
