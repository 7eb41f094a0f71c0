"""Data parallelism through torchrun, on the CPU with gloo and 2 ranks (real processes): one model
on both ranks, every sample once per epoch across them, SIGTERM to torchrun stopping every rank
with one valid checkpoint, each rank's metrics on base port + local rank, and checkpoints moving
between 1 and 2 ranks."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from shards.tarwriter import sha256_file
from tests.mounts import tmpfs
from tests.service_proc import ROOT, TORCHRUN_2, Service, checkpoint_steps, events, free_port, run_service

pytestmark = pytest.mark.slow
STEPS_2_RANKS = 3  # 144 training images / 2 ranks / batch 24


def _ids(path: Path) -> dict[int, list[int]]:
    """Sample ids per epoch from a debug.ids file."""
    epochs: dict[int, list[int]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        epochs.setdefault(record["epoch"], []).extend(record["ids"])
    return epochs


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_two_ranks_train_one_model_on_disjoint_halves(sample_shards: Path, tmp_path: Path) -> None:
    out, port = tmp_path / "run", free_port(2)
    service = Service(sample_shards, out, "--epochs", "2", "--debug.ids", "true", "--http.port", str(port),
                      launcher=TORCHRUN_2)
    try:
        service.wait_for(r"epoch 1 step 1/3")
        scrapes = [_scrape(port + local_rank) for local_rank in (0, 1)]  # base port + LOCAL_RANK
        assert service.wait() == 0, service.stderr
    finally:
        service.kill()
    assert all('world_size="2"' in text and "alexnet_train_images_total" in text for text in scrapes)
    assert "global batch 48 (24 x 2 rank(s)), lr 0.02" in service.stdout
    finished = [events(out, "finished", rank)[0] for rank in (0, 1)]
    assert finished[0]["step"] == finished[1]["step"] == 2 * STEPS_2_RANKS
    assert finished[0]["param_digest"] == finished[1]["param_digest"]  # DDP kept the replicas identical
    ranks = [_ids(out / "ids.jsonl"), _ids(out / "ids.rank1.jsonl")]
    for epoch in (1, 2):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert not set(a) & set(b) and sorted(a + b) == sorted(set(a + b)) and len(a + b) == 144
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history[0]["lr"] == 0.02


def test_sigterm_to_torchrun_stops_every_rank_with_one_checkpoint(sample_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    service = Service(sample_shards, out, "--epochs", "3", launcher=TORCHRUN_2)
    try:
        service.wait_for(r"epoch 2 step 1/3")
        service.signal(signal.SIGTERM)  # to torchrun's agent, which forwards it to both ranks
        sent = time.monotonic()
        service.wait(timeout=60)  # torchrun itself reports the signal and exits 1
        assert time.monotonic() - sent < 30
    finally:
        service.kill()
    stopped = [events(out, "stopped", rank) for rank in (0, 1)]
    assert all(len(s) == 1 and s[0]["reason"] == "SIGTERM" for s in stopped), service.stdout
    step = stopped[0][0]["step"]
    assert stopped[1][0]["step"] == step and stopped[0][0]["param_digest"] == stopped[1][0]["param_digest"]
    assert STEPS_2_RANKS < step <= 2 * STEPS_2_RANKS and checkpoint_steps(out)[-1] == step
    payload = torch.load(out / f"checkpoint-{step:09d}.pt", weights_only=True)
    assert len(payload["loaders"]) == 2 and payload["progress"]["step"] == step
    assert "Traceback" not in service.stdout.split("SignalException")[0]  # no rank failed


def test_sigterm_to_the_whole_process_group_stops_every_rank_with_one_checkpoint(sample_shards: Path,
                                                                                 tmp_path: Path) -> None:
    """A closed terminal or a service manager stopping the unit signals the whole process group.
    torchrun starts its ranks in sessions of their own, so they get the agent's copy alone: every
    rank still stops at the same step with one checkpoint (a rank in the group too would get the
    signal twice: ``tests/test_service_signals.py``)."""
    out = tmp_path / "run"
    service = Service(sample_shards, out, "--epochs", "3", launcher=TORCHRUN_2, group=True)
    service.stop_at(r"epoch 2 step 1/3", group=True, timeout=60)
    stopped = [events(out, "stopped", rank) for rank in (0, 1)]
    assert all(len(s) == 1 and s[0]["reason"] == "SIGTERM" for s in stopped), service.stdout + service.stderr
    step = stopped[0][0]["step"]
    assert stopped[1][0]["step"] == step and checkpoint_steps(out)[-1] == step


def test_a_checkpoint_moves_from_one_rank_to_two_and_back(sample_shards: Path, tmp_path: Path) -> None:
    """Epoch 1 on one process, epoch 2 on two ranks, epoch 3 on one again: each run resumes the
    last, the data is split anew, and the lr follows the rule for its global batch."""
    out = tmp_path / "run"
    legs = [("1", ()), ("2", TORCHRUN_2), ("3", ())]
    for epochs, launcher in legs:
        rc, service = run_service(sample_shards, out, "--epochs", epochs, launcher=launcher)
        assert rc == 0, service.stderr
        if epochs != "1":
            assert "resuming run" in service.stdout
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["lr"] for h in history] == [0.01, 0.02, 0.01]
    assert events(out, "finished")[-1]["step"] == 6 + STEPS_2_RANKS + 6


def test_an_epoch_trained_on_two_ranks_keeps_its_loss_when_evaluated_on_one(sample_shards: Path, tmp_path: Path) -> None:
    """Stopped at epoch 1's end on two ranks, its evaluation pending; resumed on one process, where
    the saved loader positions do not apply.  The epoch is trained, so it is not trained again, and
    its record must hold the loss and speed the two ranks counted (they were zeroed: train loss
    0.0, 0.0 img/s); epoch 2 is then a whole epoch of this run's 6 steps."""
    out, args = tmp_path / "run", ("--epochs", "2", "--eval_views", "10")  # 10 views: a long evaluation to stop in
    first = Service(sample_shards, out, *args, "--http.port", str(free_port(2)), launcher=TORCHRUN_2)
    first.stop_at(rf"epoch 1 step {STEPS_2_RANKS}/{STEPS_2_RANKS}")
    assert f"at step {STEPS_2_RANKS}, epoch 1 trained, its evaluation pending" in first.stdout, first.stdout
    losses = [e["loss"] for e in events(out, "train") if e["epoch"] == 1]  # rank 0's, whose progress is saved
    rc, second = run_service(sample_shards, out, *args)
    assert rc == 0, second.stderr
    history = json.loads((out / "history.json").read_text())
    assert history[0]["train_loss"] == pytest.approx(sum(losses) / STEPS_2_RANKS, rel=1e-5)
    assert history[0]["images_per_s"] > 0 and events(out, "eval")[0]["train_loss"] == history[0]["train_loss"]
    assert "epoch 1 step" not in second.stdout and "epoch 2 step 6/6" in second.stdout
    assert "epoch 2 step 7/" not in second.stdout and events(out, "finished")[-1]["step"] == STEPS_2_RANKS + 6
    assert "split anew from epoch 2 on; epoch 1, trained, is evaluated with its own counters" in second.stderr


# One process group of one rank (gloo), so DDP's hooks and Dynamo's DDP handling run for real.
COMPILED_DDP = r"""
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
import torch, torch.distributed as dist
from model import AlexNet, PaperSGD, train_step
from model.optim import param_groups
from model.step import CompiledStep
from service.dist import replica
dist.init_process_group("gloo")
models = []
for _ in range(2):
    torch.manual_seed(0)
    m = AlexNet(num_classes=10, bias_init=0.1, dropout=0.0)
    models.append((m, PaperSGD(param_groups(m, 5e-4), lr=0.01)))
(model, opt), (eager, eager_opt) = models
before = {n: p.detach().clone() for n, p in eager.named_parameters()}
step = CompiledStep(model, opt, 4, trainable=replica(model, torch.device("cpu"), compiled=True))
gen = torch.Generator().manual_seed(0)
x, y = 50 * torch.randn(4, 3, 224, 224, generator=gen), torch.randint(0, 10, (4,), generator=gen)
step(x, y), train_step(eager, eager_opt, x, y)
for (name, p), q in zip(model.named_parameters(), eager.parameters()):
    update, expected = (p - before[name]).norm().item(), (q - before[name]).norm().item()
    print(f"{name} {update / expected:.4f}")
dist.destroy_process_group()
"""


def test_a_compiled_step_on_a_ddp_replica_updates_every_layer_as_the_eager_step(tmp_path: Path) -> None:
    """The compiled step through DDP (what every rank of a compiled multi-rank run trains with)
    against the eager step on the same batch: each tensor's update the same size.  With Dynamo's
    DDP graph split, torch 2.13 left conv1-conv5 at weight decay alone (ratios 0.001-0.2)."""
    out = subprocess.run([sys.executable, "-c", COMPILED_DDP, str(free_port())], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    ratios = dict(line.split() for line in out.stdout.splitlines())
    assert len(ratios) == 16
    wrong = {name: r for name, r in ratios.items() if abs(float(r) - 1) > 0.01}
    assert not wrong, f"compiled DDP updates differ from eager (update ratios): {wrong}"


def test_a_diverging_run_stops_every_rank_at_the_same_step_with_exit_6(sample_shards: Path, tmp_path: Path) -> None:
    """lr 5 (10 for the global batch) overflows the loss; the ranks agree on the verdict, so both stop
    at one step (no rank left waiting in an all-reduce) and record exit 6 for the entrypoint."""
    out, exit_file = tmp_path / "run", tmp_path / "exit-code"
    service = Service(sample_shards, out, "--epochs", "3", "--optim.lr", "5", "--http.port", str(free_port(2)),
                      launcher=TORCHRUN_2, env={"ALEXNET_EXIT_FILE": str(exit_file)})
    try:
        rc = service.wait(300)
    finally:
        service.kill()
    assert rc != 0 and exit_file.read_text() == "6\n", service.stderr  # torchrun itself exits 1
    lines = [line for line in service.stderr.splitlines() if line.startswith("service: ")]
    assert len(lines) == 2 and lines[0] == lines[1] and "training diverged at step" in lines[0], service.stderr
    assert not events(out, "finished", 0) and not events(out, "finished", 1)
    for path in out.glob("checkpoint-*.pt"):
        model = torch.load(path, map_location="cpu", weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in model.values()), path


def test_a_base_port_past_the_last_ranks_range_is_one_line_on_every_rank(sample_shards: Path, tmp_path: Path) -> None:
    """--http.port 65535 on two ranks: rank 1 would need port 65536.  Every rank refuses alike
    before joining (not an OverflowError traceback from rank 1's bind, and rank 0 left waiting)."""
    exit_file = tmp_path / "exit-code"
    service = Service(sample_shards, tmp_path / "run", "--http.port", "65535", launcher=TORCHRUN_2,
                      env={"ALEXNET_EXIT_FILE": str(exit_file)})
    try:
        service.wait(timeout=120)
    finally:
        service.kill()
    ranks_said = [line for line in service.errors if line.startswith("service: ")]
    assert ranks_said == ["service: http.port 65535: each of the 2 ranks on this machine serves on http.port + its "
                          "LOCAL_RANK, up to 65536, past the last port 65535: choose --http.port 65534 or lower "
                          "(or 0: any free ports)"] * 2, service.stderr
    assert "OverflowError" not in service.stderr and "[rank" not in service.stderr
    assert exit_file.read_text() == "2\n"


def test_a_taken_port_of_one_rank_stops_every_rank_with_one_line(sample_shards: Path, tmp_path: Path) -> None:
    """Rank 1's port (base + 1) is taken: rank 1 says so, and rank 0 says which rank failed and
    why instead of dying of its departure in the next collective (a gloo traceback)."""
    exit_file, port = tmp_path / "exit-code", free_port(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 1))
        taken.listen()
        service = Service(sample_shards, tmp_path / "run", "--http.port", str(port), launcher=TORCHRUN_2,
                          env={"ALEXNET_EXIT_FILE": str(exit_file)})
        try:
            service.wait(timeout=120)
        finally:
            service.kill()
    in_use = (f"port {port + 1} on 127.0.0.1 is already in use (another run or exporter?): stop it or choose another "
              "port with --http.port N (make demo / train-local: PORT=N)")
    said = sorted(line for line in service.errors if line.startswith("service: "))
    assert said == sorted([f"service: {in_use}", f"service: rank 1: {in_use}"]), service.stderr  # rank 1, rank 0
    assert "RuntimeError" not in service.stderr and "Connection closed" not in service.stderr
    assert exit_file.read_text() == "3\n"


def test_a_full_disk_under_rank_0s_checkpoint_stops_every_rank_with_its_line(sample_shards: Path, tmp_path: Path) -> None:
    """Rank 0 alone writes checkpoints; room for one, not for the second.  Its write failure is
    agreed as a stop is, so rank 1 says rank 0's line and both exit 4, instead of rank 1 dying
    of rank 0's departure in its next all-reduce (a gloo traceback)."""
    exit_file = tmp_path / "exit-code"
    with tmpfs(tmp_path / "disk", "size=700m") as disk:
        out = disk / "run"
        service = Service(sample_shards, out, "--epochs", "2", "--checkpoint.every_steps", "1",
                          "--http.port", str(free_port(2)), launcher=TORCHRUN_2, env={"ALEXNET_EXIT_FILE": str(exit_file)})
        try:
            service.wait(timeout=300)
        finally:
            service.kill()
        said = [line for line in service.errors if line.startswith("service: ")]
        (own,) = [line for line in said if not line.startswith("service: rank 0: ")] or [service.stderr]
        message = own.removeprefix("service: ")
        assert sorted(said) == sorted([own, f"service: rank 0: {message}"]), service.stderr
        assert message.startswith(f"writing a checkpoint in {out} failed: the disk is full: checkpoint-000000002.pt "
                                  "needs about 455 MB"), message
        # torchrun's own ChildFailedError traceback stays: no rank's (torchrun prefixes those "[rank1]:")
        assert "[rank" not in service.stderr and "Connection closed" not in service.stderr, service.stderr
        assert exit_file.read_text() == "4\n" and checkpoint_steps(out) == [1]


def test_a_data_error_on_one_rank_is_one_line_on_the_other(sample_shards: Path, tmp_path: Path) -> None:
    """One rank reads the last training shard, whose JPEGs lost their headers (the manifest's
    sha256 made to match, so only the decoder can notice): that rank says its loader failed
    (exit 1), and the other, whose next collective finds it gone, says so in one line pointing at
    the first's instead of a gloo traceback, and leaves the exit code the first recorded."""
    shards, exit_file = tmp_path / "shards", tmp_path / "exit-code"
    shutil.copytree(sample_shards, shards)
    tar = sorted((shards / "train").glob("*.tar"))[-1]
    with tarfile.open(tar) as t:
        starts = [m.offset_data for m in t.getmembers() if m.name.endswith(".jpg")]
    with open(tar, "r+b") as f:
        for start in starts:
            f.seek(start)
            f.write(b"NOT A JPEG")
    record = json.loads((shards / "manifest.json").read_text())
    for shard in record["splits"]["train"]["shards"]:
        if shard["tar"] == tar.name:
            shard["sha256"] = sha256_file(tar)
    (shards / "manifest.json").write_text(json.dumps(record))
    service = Service(shards, tmp_path / "run", "--epochs", "1", "--http.port", str(free_port(2)),
                      launcher=TORCHRUN_2, env={"ALEXNET_EXIT_FILE": str(exit_file)})
    try:
        service.wait(timeout=300)
    finally:
        service.kill()
    said = [line for line in service.errors if line.startswith("service: ")]
    assert "[rank" not in service.stderr and "Connection closed" not in service.stderr, service.stderr
    assert any("the train loader failed" in line for line in said), said  # one rank's own line
    gone = [line for line in said if line.endswith(": stopped: another rank of this job ended first; its own "
                                                   "line says why")]
    assert len(gone) == 1 and re.fullmatch(r"service: rank [01]: .*", gone[0]), said
    assert exit_file.read_text() == "1\n"
