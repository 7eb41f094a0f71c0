"""``make bench-pipeline`` names the Pillow its decode floor measured.  Its table, chart and
record said "Pillow-SIMD" whatever ran: the GPU machines' plain Pillow 12.3.0 floor (docs/benchmarks.md)
was labelled as the SIMD build the issue's ratio is meant against.  A plain Pillow is installed
from the package index into a folder of its own and put first on the path, as on such a machine."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import PIL
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # bench_pipeline's interpreter, DALI and a timed round per case
PLAIN = "12.3.0"


def _plain_pillow(folder: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder),
                           f"pillow=={PLAIN}"], capture_output=True, text=True, timeout=300)
    if done.returncode:
        pytest.skip(f"plain Pillow {PLAIN} cannot be installed here: {done.stderr.strip()[-300:]}")
    return folder


@pytest.mark.parametrize("which", ["Pillow-SIMD", "Pillow"])
def test_the_decode_floor_names_the_pillow_that_ran(which: str, sample_shards: Path, tmp_path: Path) -> None:
    path, version = str(ROOT), PIL.__version__
    if which == "Pillow":
        path, version = f"{_plain_pillow(tmp_path / 'plain')}{os.pathsep}{ROOT}", PLAIN
    elif md.version("Pillow-SIMD") != PIL.__version__:  # pragma: no cover - the project's setup builds it
        pytest.skip("this environment's Pillow is not Pillow-SIMD")
    report = tmp_path / "p.json"
    done = subprocess.run([sys.executable, "-m", "bench.bench_pipeline", "--shards", str(sample_shards), "--report",
                           str(report), "--images", "64", "--repeat", "1", "--warmup", "1", "--configs", "gpu-check"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"(3) decode floor: {which} decode, 1 process per core" in done.stdout, done.stdout
    record = json.loads(report.read_text())
    assert (record["machine"]["pillow_distribution"], record["machine"]["pillow"]) == (which, version)
    assert record["decode_floor_definition"].startswith(f"{which} {version} decode of the same"), record
