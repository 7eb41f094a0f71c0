"""Checkpoint files in-process: the atomic write and its CRC (a flipped byte that ``torch.load``
alone accepts is caught), the newest readable file with damaged ones set aside, pruning, and the
background writer.  (As real service processes: ``tests/test_service_checkpoints.py``.)"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from service import checkpoint as ckpt
from service.checkpoint_crc import checksum
from service.checkpoint_writer import CheckpointWriter
from service.errors import ServiceError


def _payload(step: int) -> dict:
    return {"format": ckpt.FORMAT, "version": ckpt.VERSION, "run_id": "r", "config": {}, "identity": {},
            "progress": {"step": step}, "model": {"w": torch.full((1000,), float(step))}, "velocity": {},
            "schedule": {}, "loaders": [{"dali": "x"}], "rng": [{"python": (3, (1, 2), None)}], "lr_scale": 1.0}


def _save(out: Path, step: int) -> Path:
    payload = _payload(step)
    payload["crc32"] = checksum(payload)
    ckpt.atomic_save(payload, ckpt.path_for(out, step))
    return ckpt.path_for(out, step)


def test_checkpoint_round_trip_and_damage_is_detected(tmp_path: Path) -> None:
    path = _save(tmp_path, 7)
    assert path.name == "checkpoint-000000007.pt" and not list(tmp_path.glob(".*.tmp"))
    assert torch.equal(ckpt.load(path)["model"]["w"], torch.full((1000,), 7.0))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data: torch.load alone accepts it
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.Unreadable, match="checksum"):
        ckpt.load(path)
    path.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ckpt.Unreadable):
        ckpt.load(path)


def test_newest_valid_sets_damaged_ones_aside_and_prune_keeps_k(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        _save(tmp_path, step)
    ckpt.path_for(tmp_path, 6).write_bytes(b"not a zip")
    (tmp_path / ".checkpoint-000000008.pt.123.tmp").write_bytes(b"half")
    said: list[str] = []
    path, payload = ckpt.newest_valid(tmp_path, said.append)
    assert path.name == "checkpoint-000000004.pt" and payload["progress"]["step"] == 4
    assert "checkpoint-000000006.pt is unreadable" in said[0]
    assert (tmp_path / "checkpoint-000000006.pt.corrupt").exists()
    assert [p.name for p in ckpt.remove_stale_temps(tmp_path)] == [".checkpoint-000000008.pt.123.tmp"]
    _save(tmp_path, 8)
    assert [p.name for p in ckpt.prune(tmp_path, 2)] == ["checkpoint-000000002.pt"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 8]


def test_background_writer_reports_durable_files_and_failures(tmp_path: Path) -> None:
    written: list[Path] = []
    writer = CheckpointWriter(tmp_path, keep=1, background=True, on_written=lambda p, s: written.append(p))
    writer.save(_payload(1), 1)
    writer.save(_payload(2), 2)  # waits for the first
    writer.wait()
    assert [p.name for p in written] == ["checkpoint-000000001.pt", "checkpoint-000000002.pt"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2] and ckpt.load(written[-1])["progress"]["step"] == 2
    shutil.rmtree(tmp_path)  # the directory vanishes under the writer
    writer.save(_payload(3), 3)
    with pytest.raises(ServiceError, match="writing a checkpoint") as info:
        writer.wait()
    assert info.value.code == 4
