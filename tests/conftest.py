"""Shared fixtures: a small sample dataset and its shards, made once per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sampledata.generate import SampleConfig, generate
from shards.build import build
from shards.config import ShardConfig

ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` from the repository root in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, check=check,
                          capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="session")
def sample_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample dataset at a test size: 6 classes, 24 train + 6 val images each (quirks included)."""
    out = tmp_path_factory.mktemp("sample")
    generate(SampleConfig(out=out, classes=6, train_per_class=24, val_per_class=6, seed=1))
    return out


@pytest.fixture(scope="session")
def sample_shards(sample_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sample_src`` sharded into several small shards per split."""
    out = tmp_path_factory.mktemp("shards")
    build(ShardConfig(src=sample_src, out=out, shard_samples=20, workers=2).validate())
    return out


@pytest.fixture(autouse=True)
def no_stray_sharders():
    """After each test, kill what is left of the sharder processes it started (tests.shards_proc):
    a test that fails while looking for a hang must not leave the hang running."""
    yield
    started = getattr(sys.modules.get("tests.shards_proc"), "STARTED", [])
    while started:
        started.pop().kill()
