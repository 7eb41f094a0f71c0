"""Interrupt `python -m shards` with real signals; the re-run gives the uninterrupted output."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards import manifest as contract
from sampledata.generate import SampleConfig, generate
from shards.build import build
from shards.config import ShardConfig
from tests.conftest import ROOT

ARGS = ["--shard_samples", "6", "--workers", "1", "--chunk", "1"]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (the journal aside: it is resume bookkeeping) -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".journal.jsonl"}


def _start(src: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "shards", "--src", str(src), "--out", str(out), *ARGS],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_shards(out: Path, count: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while len(list((out / "train").glob("train-*.tar"))) < count:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(sample_src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run([sys.executable, "-m", "shards", "--src", str(sample_src), "--out", str(out), *ARGS],
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
    return _tree(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_resumes_to_identical_output(sig: int, sample_src: Path, tmp_path: Path,
                                                     reference: dict[str, bytes]) -> None:
    out = tmp_path / "out"
    proc = _start(sample_src, out)
    _wait_for_shards(out, 3, proc)
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    assert code != 0, "the interrupted run must not report success"
    if sig != signal.SIGKILL:
        assert code == 130 and "re-run the same command to resume" in proc.stderr.read()
        assert not list(out.rglob("*.tmp")), "a clean interrupt leaves no temp files"
    assert not (out / "manifest.json").exists(), "an unfinished directory has no manifest"
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("train-*.tar")}
    rerun = _start(sample_src, out)
    assert rerun.wait(timeout=120) == 0, rerun.stderr.read()
    assert _tree(out) == reference
    kept = [n for n, t in finished.items() if (out / "train" / n).stat().st_mtime_ns == t]
    assert kept, "complete shards from the interrupted run are kept, not rewritten"


def test_rerun_redoes_a_corrupted_shard(sample_src: Path, tmp_path: Path) -> None:
    cfg = ShardConfig(src=sample_src, out=tmp_path, shard_samples=30, workers=2).validate()
    build(cfg)
    before = _tree(tmp_path)
    shard = contract.load(tmp_path).splits["train"].shards[2].tar
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF  # same size, different bytes: only the checksum notices
    shard.write_bytes(bytes(data))
    untouched = contract.load(tmp_path).splits["train"].shards[1].tar.stat().st_mtime_ns
    build(cfg)
    assert _tree(tmp_path) == before
    assert contract.load(tmp_path).splits["train"].shards[1].tar.stat().st_mtime_ns == untouched


def test_shard_bytes_limit(sample_src: Path, tmp_path: Path) -> None:
    limit = 400_000
    record = build(ShardConfig(src=sample_src, out=tmp_path, shard_samples=0, shard_bytes=limit, workers=2).validate())
    shards = record["splits"]["train"]["shards"]
    assert len(shards) > 3
    # The tar's final 10 KiB record padding is the only slack allowed past the limit.
    assert all(s["bytes"] <= limit + 10240 for s in shards)
    assert sum(s["samples"] for s in shards) == record["splits"]["train"]["samples"]


def test_rerun_says_it_reverifies_the_finished_shards(sample_src: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Resume re-hashes every finished shard (~37 s of one core at ImageNet size): it says so first."""
    cfg = ShardConfig(src=sample_src, out=tmp_path, shard_samples=30, workers=2).validate()
    build(cfg)
    (tmp_path / "manifest.json").unlink()  # an unfinished directory: every shard written, no manifest
    capsys.readouterr()
    build(cfg)
    shards = len(contract.load(tmp_path).splits["train"].shards)
    assert f"resuming train: re-verifying the sha256 of {shards} finished shards" in capsys.readouterr().out


def test_a_rerun_of_a_finished_directory_leaves_it_as_it_was(sample_src: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Same sources and settings: the shards are re-hashed and nothing is written, the manifest
    included (a re-run used to delete it first and write it back at its end).  Another
    statistics sample is a change: the statistics are computed again."""
    cfg = ShardConfig(src=sample_src, out=tmp_path, shard_samples=30, workers=2).validate()
    build(cfg)
    manifest = tmp_path / "manifest.json"
    before, stamp = _tree(tmp_path), (manifest.stat().st_ino, manifest.stat().st_mtime_ns)
    capsys.readouterr()
    build(cfg)
    m = contract.load(tmp_path)
    shards = sum(len(m.splits[s].shards) for s in contract.SPLITS)
    out = capsys.readouterr().out
    assert f"re-verifying the sha256 of {shards} shards" in out and "complete and unchanged; nothing to do" in out
    assert (manifest.stat().st_ino, manifest.stat().st_mtime_ns) == stamp and _tree(tmp_path) == before
    build(dataclasses.replace(cfg, stats_images=100))
    assert json.loads((tmp_path / "stats.json").read_text())["images"] == 100


def test_a_rerun_of_a_finished_directory_stopped_early_keeps_its_manifest(sample_src: Path, tmp_path: Path) -> None:
    """Ctrl-C in a re-run's first seconds (``make demo`` re-runs ``make shards``) leaves the
    finished directory readable: before, the manifest was gone until the re-run's end."""
    subprocess.run([sys.executable, "-m", "shards", "--src", str(sample_src), "--out", str(tmp_path), *ARGS],
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "shards", "--src", str(sample_src), "--out", str(tmp_path), *ARGS],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "re-verifying" in line:
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=60)
    contract.load(tmp_path, deep=True)  # raises when the manifest is missing or a shard differs from it


@pytest.mark.parametrize("how", ["cut short", "an entry inside"])
def test_a_rerun_rewrites_a_stale_index_from_its_tar(sample_src: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str], how: str) -> None:
    """A tar that still has its sha256 with an index that no longer fits it (cut short: DALI
    would skip samples without a word; an entry inside pointing at another sample's JPEG, which
    DALI would read under this one's label; the service refuses both): a re-run rewrites that
    index, the very bytes ``make shards`` wrote, and nothing else."""
    cfg = ShardConfig(src=sample_src, out=tmp_path, shard_samples=30, workers=2).validate()
    build(cfg)
    shard = contract.load(tmp_path).splits["train"].shards[1]
    good = shard.index.read_bytes()
    lines = good.splitlines()
    if how == "cut short":
        lines = lines[:-3]
    else:  # entry 3's JPEG where entry 2's is
        fields = lines[3].split()
        fields[1:3] = lines[2].split()[1:3]
        lines[3] = b" ".join(fields)
    shard.index.write_bytes(b"\n".join(lines) + b"\n")
    before = {p: b for p, b in _tree(tmp_path).items() if p != shard.index.relative_to(tmp_path).as_posix()}
    capsys.readouterr()
    build(cfg)
    assert shard.index.read_bytes() == good
    assert f"shards: rewrote {shard.index} from its tar" in capsys.readouterr().out
    assert {p: b for p, b in _tree(tmp_path).items() if p != shard.index.relative_to(tmp_path).as_posix()} == before
    assert contract.index_problem(shard, shard.bytes) is None


def test_the_finished_shards_of_another_dataset_are_not_replaced(sample_src: Path, tmp_path: Path) -> None:
    """``make demo`` shards the sample into data/shards, the default --out of ImageNet too: a
    dataset of other classes is refused in one line (exit 1), and the shards there stay as they were."""
    out, other = tmp_path / "shards", tmp_path / "other"
    build(ShardConfig(src=sample_src, out=out, shard_samples=30, workers=2).validate())
    generate(SampleConfig(out=other, classes=2, train_per_class=3, val_per_class=1, seed=5))
    before = _tree(out)
    done = subprocess.run([sys.executable, "-m", "shards", "--src", str(other), "--out", str(out), *ARGS], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (f"shards: error: {out} holds the finished shards of another dataset (6 classes, "
                                   f"180 images), {other} has 2 classes: writing here would replace them. Choose "
                                   f"another --out (make: OUT=dir), or delete {out} first")
    assert _tree(out) == before
