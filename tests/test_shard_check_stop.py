"""A stop during the shard check before training (``data.verify before``) is honoured at once:
at ImageNet's ~140 GB the check takes minutes, far beyond torchrun's 30 s between SIGTERM and
SIGKILL.  A real service process, a real SIGTERM, real shards: one training shard made 6 GiB
larger (a sparse tail of zeros after the tar's end-of-archive blocks, with the manifest's size
and sha256 to match), so hashing it takes seconds on any machine (one thread hashes one shard)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

from tests.service_proc import Service, checkpoint_steps, events

BIG = "train-000000.tar"
PAD = 6 << 30


def pad_shard(shards: Path) -> None:
    """Grow ``BIG`` by ``PAD`` zero bytes (sparse: no disk used) and record it in the manifest."""
    tar = shards / "train" / BIG
    digest = hashlib.sha256(tar.read_bytes())
    zeros = bytes(16 << 20)
    for _ in range(PAD // len(zeros)):
        digest.update(zeros)
    os.truncate(tar, tar.stat().st_size + PAD)
    path = shards / "manifest.json"
    record = json.loads(path.read_text())
    entry = next(s for s in record["splits"]["train"]["shards"] if s["tar"] == BIG)
    entry["bytes"], entry["sha256"] = tar.stat().st_size, digest.hexdigest()
    path.write_text(json.dumps(record, indent=1) + "\n")


def test_a_stop_during_the_check_before_training_ends_the_start_at_once(sample_shards: Path,
                                                                        tmp_path: Path) -> None:
    shards, out = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(sample_shards, shards)
    pad_shard(shards)
    service = Service(shards, out, "--epochs", "1", "--data.verify", "before")
    try:
        service.wait_for(r"shards: checking 10 shard\(s\), 6\.4 GB, against the manifest before training")
        signalled = time.monotonic()
        service.signal(signal.SIGTERM)
        rc = service.wait(timeout=120)
        took = time.monotonic() - signalled
    finally:
        service.kill()
    # was: the whole check, then the loaders and a step-0 checkpoint before the stop was seen
    assert rc == 0, service.stderr
    assert took < 30, took  # torchrun's grace before SIGKILL; here it is a block of the hash
    (line,) = service.stderr.strip().splitlines()
    assert line.startswith("service: stopped (SIGTERM) during the shard check before training (data.verify before), "
                           "after "), line
    assert "of 10 shard(s): nothing was trained or checkpointed; the check runs again at the next start" in line
    assert "Traceback" not in service.stderr and "train:" not in service.stdout  # no loader was built
    assert checkpoint_steps(out) == []
    remembered = json.loads((out / "shard-checks.json").read_text())["shards"] \
        if (out / "shard-checks.json").exists() else {}
    assert str(shards / "train" / BIG) not in remembered  # the next start hashes it again
    assert all(entry["problem"] is None for entry in remembered.values())  # a stop is not a finding
    (stopped,) = events(out, "shard_check_interrupted")
    assert stopped["reason"] == "SIGTERM" and stopped["of"] == 10 and stopped["shards"] == len(remembered) < 10
