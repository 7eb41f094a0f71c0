"""SIGTERM/SIGINT/kill -9 at every phase of `python -m shards`, in real processes (issue 14).

Each run is the leader of its own session, like a job under ``timeout`` or systemd.  A signal
(to it alone, or to its whole process group: every worker gets it too) must end it within a
few seconds with one line saying what was kept, leave no process behind, and the re-run must
write byte-identical shards, indexes, statistics and manifest.  Phases the sample data passes
too fast to hit are slowed down by ``tests.shards_proc``; writing and statistics are slowed per
image, so the signal lands with tasks in flight.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import run_module
from tests.shards_proc import Sharder

pytestmark = pytest.mark.slow

ARGS = ("--shard_samples", "6", "--workers", "2", "--chunk", "4")
# phase -> (what is slowed, the marker to wait for)
PHASES = {
    "scan": "shards.build:scan=60",
    "writing": "shards.write_split:_encode=0.03",
    "statistics": "shards.stats:PixelMoments.add=0.05",
    "manifest": "shards.build:atomic_write_text=60",
}


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (the journal aside: it is resume bookkeeping) -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".journal.jsonl"}


@pytest.fixture(scope="module")
def reference(sample_src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_module("shards", "--src", str(sample_src), "--out", str(out), *ARGS)
    return _tree(out)


def _stopped_cleanly(sharder: Sharder, signalled: float, out: Path) -> str:
    """The checks every clean stop passes; returns its one line."""
    code = sharder.wait(timeout=30)
    assert time.monotonic() - signalled < 5, "a stop takes a few seconds at most"
    assert sharder.strays() == [], "every worker is gone with the sharder"
    errors = "\n".join(sharder.errors)
    assert "Traceback" not in errors, errors
    assert not list(out.rglob("*.tmp")), "a clean stop leaves no temp files"
    assert not (out / "manifest.json").exists(), "an unfinished directory has no manifest"
    assert code == 130, errors
    line = sharder.errors[-1]
    assert line.startswith("shards: interrupted (") and "re-run the same command to resume" in line, errors
    assert sum("interrupted" in e for e in sharder.errors) == 1, errors
    return line


def _resumes_to_reference(src: Path, out: Path, reference: dict[str, bytes]) -> None:
    rerun = run_module("shards", "--src", str(src), "--out", str(out), *ARGS, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert _tree(out) == reference


@pytest.mark.parametrize("phase,sig,group", [
    ("scan", signal.SIGTERM, True),
    ("scan", signal.SIGINT, False),
    ("writing", signal.SIGTERM, True),
    ("writing", signal.SIGINT, True),
    ("writing", signal.SIGTERM, False),
    ("statistics", signal.SIGTERM, True),
    ("statistics", signal.SIGINT, False),
    ("manifest", signal.SIGTERM, True),
    ("manifest", signal.SIGINT, True),
])
def test_signal_in_every_phase_stops_cleanly_and_resumes(phase: str, sig: int, group: bool, sample_src: Path,
                                                         tmp_path: Path, reference: dict[str, bytes]) -> None:
    out = tmp_path / "out"
    slowed = PHASES[phase]
    sharder = Sharder(sample_src, out, *ARGS, patches=("--slow", slowed))
    sharder.wait_for(f"slow: {slowed.split('=')[0]}")
    if phase == "writing":  # some shards finished, others in flight
        deadline = time.monotonic() + 60
        while len(list((out / "train").glob("train-*.tar"))) < 2:
            assert time.monotonic() < deadline and sharder.proc.poll() is None
            time.sleep(0.01)
    sharder.signal(sig, group)
    line = _stopped_cleanly(sharder, time.monotonic(), out)
    assert f"({phase})" in line
    if phase == "writing":
        assert "kept " in line and " train shards (" in line
    if phase in ("statistics", "manifest"):
        assert "kept every shard" in line
    _resumes_to_reference(sample_src, out, reference)


def test_group_sigterm_at_full_speed_never_hangs(sample_src: Path, tmp_path: Path,
                                                 reference: dict[str, bytes]) -> None:
    """The hang of issue 14: ``kill -- -PGID`` while small tasks stream; the old pool hung 5 times of 6."""
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        sharder = Sharder(sample_src, out, *ARGS)
        sharder.wait_for("shards: writing with")
        time.sleep(0.2)
        sharder.signal(signal.SIGTERM, group=True)
        _stopped_cleanly(sharder, time.monotonic(), out)
    _resumes_to_reference(sample_src, out, reference)


def test_a_killed_worker_ends_the_run_with_a_line_not_a_hang(sample_src: Path, tmp_path: Path,
                                                             reference: dict[str, bytes]) -> None:
    """kill -9 on one worker (what the OOM killer does): before, the pool replaced it and waited forever."""
    out = tmp_path / "out"
    sharder = Sharder(sample_src, out, *ARGS, patches=("--slow", PHASES["writing"]))
    sharder.wait_for("slow: shards.write_split:_encode")
    victim = sharder.workers()[0]
    os.kill(victim, signal.SIGKILL)
    code = sharder.wait(timeout=30)
    assert code == 1 and sharder.strays() == []
    assert f"worker process {victim} was killed by SIGKILL" in sharder.errors[-1]
    assert "re-run the same command to resume" in sharder.errors[-1]
    _resumes_to_reference(sample_src, out, reference)


def test_workers_do_not_outlive_a_killed_sharder(sample_src: Path, tmp_path: Path) -> None:
    """kill -9 on the sharder alone: its workers notice (end of file on their pipe) and exit."""
    sharder = Sharder(sample_src, tmp_path / "out", *ARGS, patches=("--slow", PHASES["writing"]))
    sharder.wait_for("slow: shards.write_split:_encode")
    assert len(sharder.workers()) == 2
    sharder.signal(signal.SIGKILL, group=False)
    sharder.wait(timeout=30)
    deadline = time.monotonic() + 5
    while sharder.strays() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sharder.strays() == []
