"""The service as a real process: SIGTERM and kill -9 mid-epoch, kill -9 while a checkpoint is
written, and exact resume (the loader's position, the loss curve, every sample once)."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.service_proc import STEPS_PER_EPOCH, Service, checkpoint_steps, events, run_service

pytestmark = pytest.mark.slow


def _ids_by_step(out: Path) -> dict[int, list[int]]:
    """debug.ids: the sample ids of every trained step, by global step (a later line wins)."""
    steps: dict[int, list[int]] = {}
    for line in (out / "ids.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = record["ids"]
    return steps


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in events(out, "train")}


@pytest.fixture(scope="module")
def reference(sample_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted epoch with the same settings, to compare the resumed runs against."""
    out = tmp_path_factory.mktemp("reference")
    rc, service = run_service(sample_shards, out, "--epochs", "1", "--debug.ids", "true")
    assert rc == 0, service.stderr
    return out


def test_sigterm_mid_epoch_checkpoints_and_resume_is_exact(sample_shards: Path, reference: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = Service(sample_shards, out, "--epochs", "1", "--debug.ids", "true")
    first.wait_for(r"epoch 1 step 3/6")
    first.signal(signal.SIGTERM)
    sent = time.monotonic()
    assert first.wait(timeout=60) == 0, first.stderr
    assert time.monotonic() - sent < 30  # torchrun and Docker SIGKILL after 30 s
    stopped_at = int(first.wait_for(r"stopped \(SIGTERM\) at step (\d+)").group(1))
    assert 3 <= stopped_at < STEPS_PER_EPOCH and checkpoint_steps(out) == [stopped_at]

    second = Service(sample_shards, out, "--epochs", "1", "--debug.ids", "true")
    second.wait_for(rf"resuming run .* epoch 1 step {stopped_at}/6 \(step {stopped_at} in all\)")
    assert second.wait() == 0, second.stderr
    assert f"epoch 1 step {stopped_at + 1}/6" in second.stdout and f"step {stopped_at}/6 loss" not in second.stdout

    ids, expected = _ids_by_step(out), _ids_by_step(reference)
    assert sorted(ids) == list(range(1, STEPS_PER_EPOCH + 1))
    assert ids[stopped_at + 1] == expected[stopped_at + 1]  # the loader continued at the same position
    seen = [i for step in ids.values() for i in step]
    assert len(seen) == len(set(seen)) == 144  # every training sample of the epoch exactly once
    # The loss curve continues where it stopped: the same losses as the uninterrupted run.
    assert _losses(out) == pytest.approx(_losses(reference), rel=1e-5)
    history = json.loads((out / "history.json").read_text())
    assert history[0]["train_loss"] == pytest.approx(json.loads((reference / "history.json").read_text())[0]
                                                     ["train_loss"], rel=1e-5)


def test_kill9_mid_epoch_loses_at_most_the_steps_since_the_checkpoint(sample_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = Service(sample_shards, out, "--epochs", "1", "--checkpoint.every_steps", "2")
    first.wait_for(r"checkpoint \S+checkpoint-000000002\.pt")
    first.wait_for(r"epoch 1 step 3/6")
    first.kill()  # SIGKILL: no handler, no last checkpoint
    assert checkpoint_steps(out) in ([2], [2, 4])
    resumed_from = checkpoint_steps(out)[-1]
    second = Service(sample_shards, out, "--epochs", "1", "--checkpoint.every_steps", "2")
    second.wait_for(rf"resuming run .* from \S+checkpoint-{resumed_from:09d}\.pt: .* epoch 1 step {resumed_from}/6")
    assert second.wait() == 0, second.stderr
    assert "epoch 1/1: train loss" in second.stdout and len(json.loads((out / "history.json").read_text())) == 1


def test_kill9_while_a_checkpoint_is_written(sample_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = Service(sample_shards, out, "--epochs", "1", "--checkpoint.every_steps", "2")
    first.wait_for(r"checkpoint \S+checkpoint-000000002\.pt")
    deadline = time.monotonic() + 180
    while not list(out.glob(".checkpoint-000000004.pt.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.005)
    first.kill()
    partial = list(out.glob(".checkpoint-*.tmp"))
    assert partial, "the kill came after the write finished; the test did not hit the window"
    assert checkpoint_steps(out) == [2]  # the half-written file never took a checkpoint's name

    second = Service(sample_shards, out, "--epochs", "1", "--checkpoint.every_steps", "2")
    second.wait_for(r"resuming run .* from \S+checkpoint-000000002\.pt")
    assert second.wait() == 0, second.stderr
    assert f"removed {partial[0]}" in second.stderr and not list(out.glob(".checkpoint-*.tmp"))
    assert checkpoint_steps(out) == [2, 4, 6]  # checkpoint.keep 3 (the default)
