"""A start that ended without a word (a crash in native code, ``kill -9``) makes the next start
check every shard before training (``service.unclean_end``): a damaged JPEG can crash DALI's
decoder, and with the check in the background every restart crashed again before it got there."""
from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from tests.service_proc import Service, run_service
from tests.test_shard_check import BAD_TAR, flip_jpeg_bytes

pytestmark = pytest.mark.slow


def test_a_crash_is_told_and_the_next_start_checks_the_shards_first(sample_shards: Path, tmp_path: Path) -> None:
    shards, out = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(sample_shards, shards)
    first = Service(shards, out, "--epochs", "1")
    try:
        first.wait_for(r"epoch 1 step 2/6")
        first.signal(signal.SIGSEGV)  # as a crash in DALI's decoder ends the process
        assert first.wait() == -signal.SIGSEGV
    finally:
        first.kill()
    # Was nothing at all: now the stack of every thread, where it happened.
    assert "Fatal Python error: Segmentation fault" in first.stderr and "most recent call first" in first.stderr
    assert (out / ".running-rank0").is_file()

    flip_jpeg_bytes(shards / "train" / BAD_TAR)  # decodes, as garbage pixels: trained on unless checked first
    rc, second = run_service(shards, out, "--epochs", "1")
    assert rc == 1, second.stdout + second.stderr
    assert f"the last start in {out} (pid {first.proc.pid} on " in second.stderr
    assert "did not end in Python" in second.stderr and "checks every shard before training" in second.stderr
    # The default is the check in the background; this start's came first, and nothing was trained.
    assert "against the manifest before training (data.verify before)" in second.stdout, second.stdout
    assert f"{BAD_TAR}: contents differ from the manifest's sha256" in second.stderr
    assert "found before this start trained on anything" in second.stderr and "step" not in second.stdout
    assert not (out / ".running-rank0").exists()  # a diagnosed end is an end in Python


def test_an_end_in_python_leaves_no_mark(sample_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = Service(sample_shards, out, "--epochs", "2")
    assert first.stop_at(r"epoch 1 step 2/6") == 0, first.stderr
    assert not (out / ".running-rank0").exists()
    rc, second = run_service(sample_shards, out, "--epochs", "1")
    assert rc == 0 and "did not end in Python" not in second.stderr, second.stderr
    assert "to check in the background" in second.stdout or "left to check" in second.stdout, second.stdout
