"""Two gloo ranks through torchrun (real processes) where ranks used to diverge: a validation split
that leaves one rank an empty last batch, a damaged newest checkpoint both ranks must agree to
skip, ``--fresh`` deleting the old logs before any rank opens its new one, the per-step
agreement answered a step late, the same on every rank, and a rank that sees the run directory at
another path resuming the file rank 0 chose."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sampledata.generate import SampleConfig, generate
from service import checkpoint as ckpt
from shards.build import build
from shards.config import ShardConfig
from tests.procs import alive, cmdline, descendants, kill_all
from tests.service_proc import ROOT, TORCHRUN_2, Service, checkpoint_steps, events, run_service

pytestmark = pytest.mark.slow
ODD = ("--loader.batch_size", "32", "--epochs", "1")
# Rank 1 in a mount namespace of its own where $RUN, rank 0's --out, is an empty file system and
# the run directory is at $ELSEWHERE: a node that mounts the shared storage at another path.
ELSEWHERE_RANK_1 = """#!/bin/sh
if [ "$RANK" = 1 ]; then
    exec unshare -m sh -c 'mount --bind "$0" "$1" && mount -t tmpfs tmpfs "$0" && shift &&
        exec {python} -m service "$@"' "$RUN" "$ELSEWHERE" "$@" --out "$ELSEWHERE"
fi
exec {python} -m service "$@"
"""


def _why(service) -> str:
    """What a failed torchrun said: the end of stdout and every rank's error lines."""
    errors = [line for line in service.errors if "Error" in line and "pair.cc" not in line]
    return service.stdout[-2000:] + "\n" + "\n".join(errors[:20])


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """65 validation images (5 classes x 13): at batch 32 on 2 ranks, one rank gets 33 images and
    the other 32, and both run 2 batches, so one rank's last batch holds 0 images."""
    src, out = tmp_path_factory.mktemp("odd_src"), tmp_path_factory.mktemp("odd_shards")
    generate(SampleConfig(out=src, classes=5, train_per_class=16, val_per_class=13, seed=2))
    build(ShardConfig(src=src, out=out, shard_samples=20, workers=2).validate())
    assert json.loads((out / "manifest.json").read_text())["splits"]["val"]["samples"] == 65
    return out


@pytest.fixture(scope="module")
def odd_run(odd_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """One epoch (2 steps per rank) on 2 ranks with a checkpoint after every step."""
    out = tmp_path_factory.mktemp("odd") / "run"
    rc, service = run_service(odd_shards, out, *ODD, "--checkpoint.every_steps", "1", launcher=TORCHRUN_2)
    return rc, service, out


def test_two_ranks_evaluate_a_split_that_leaves_one_rank_an_empty_batch(odd_run) -> None:
    rc, service, out = odd_run
    assert rc == 0, _why(service)
    evaluation = events(out, "eval")
    assert len(evaluation) == 1 and evaluation[0]["val_images"] == 65  # every image once, across both ranks
    assert 0 <= evaluation[0]["top5_error"] <= evaluation[0]["top1_error"] <= 1
    assert checkpoint_steps(out) == [1, 2]


def test_an_empty_last_training_batch_is_no_zero_loss_in_the_epoch_mean(tmp_path_factory: pytest.TempPathFactory
                                                                        ) -> None:
    """9 training images on 2 ranks at batch 4: rank 0 reads 4, so its second step's batch is
    empty.  Its loss was logged as 0.0000 and counted in the epoch's mean, halving the train loss."""
    src, shards = tmp_path_factory.mktemp("nine_src"), tmp_path_factory.mktemp("nine_shards")
    generate(SampleConfig(out=src, classes=3, train_per_class=3, val_per_class=1, seed=1))
    build(ShardConfig(src=src, out=shards, shard_samples=4, workers=1).validate())
    out = tmp_path_factory.mktemp("nine") / "run"
    rc, service = run_service(shards, out, "--loader.batch_size", "4", "--epochs", "1", launcher=TORCHRUN_2)
    assert rc == 0, _why(service)
    steps = events(out, "train")
    assert [s["step_in_epoch"] for s in steps] == [1, 2] and steps[0]["loss"] > 0.1
    assert steps[1]["loss"] == steps[0]["loss"]  # the empty step shows the last loss there was
    history = json.loads((out / "history.json").read_text())
    assert history[0]["train_loss"] == pytest.approx(steps[0]["loss"])  # the one step that had images


def test_two_ranks_resume_from_the_checkpoint_rank_0_chose(odd_run, odd_shards: Path, tmp_path: Path) -> None:
    """The newest checkpoint is damaged in place (same size; only its CRC tells): rank 0 alone sets
    it aside, both ranks restore the older one and check they restored the same step."""
    out = tmp_path / "run"
    shutil.copytree(odd_run[2], out)
    newest, older = ckpt.path_for(out, 2), ckpt.path_for(out, 1)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    newest.write_bytes(bytes(data))
    rc, service = run_service(odd_shards, out, *ODD, launcher=TORCHRUN_2)
    assert rc == 0, _why(service)
    assert "FileNotFoundError" not in service.stderr and "Traceback" not in service.stderr
    starts = [events(out, "start", rank)[-1] for rank in (0, 1)]
    assert all(s["resumed_from"] == str(older) and s["step"] == 1 for s in starts), starts
    assert service.stderr.count(f"checkpoint {newest} is unreadable") == 1  # one rank chose, once
    assert (out / "checkpoint-000000002.pt.corrupt").exists()
    assert events(out, "finished")[-1]["step"] == 2


def test_fresh_deletes_the_old_logs_before_any_rank_opens_its_own(sample_shards: Path, tmp_path: Path) -> None:
    """Rank 0 deletes the previous run's files; rank 1 must not open (and keep writing into) its
    old log before that, or its whole log of the new run is written into a deleted file."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.rank1.jsonl").write_text(json.dumps({"event": "from the previous run"}) + "\n")
    for i in range(3000):  # a slow deletion on rank 0 (a large run directory, slow storage)
        (out / f"checkpoint-{i:09d}.pt.corrupt").touch()
    rc, service = run_service(sample_shards, out, "--epochs", "1", "--fresh", "true", launcher=TORCHRUN_2)
    assert rc == 0, _why(service)
    rank1 = events(out, rank=1)
    assert [r["event"] for r in rank1][0] == "start" and rank1[-1]["event"] == "finished", rank1
    assert not list(out.glob("*.corrupt"))


AGREE = r"""
import json, sys
import torch
from service.dist import Agreement, Ranks

ranks = Ranks.from_env()
ranks.start(torch.device("cpu"))
agreement, answers = Agreement(ranks), []
for step in range(1, 11):  # rank 0 is signalled after step 7, rank 1's clock says "checkpoint" after step 3
    answers.append(agreement.lagged(step, ranks.rank == 0 and step == 7, ranks.rank == 1 and step == 3))
answers.append((agreement.now(ranks.rank == 1), None))
everyone = ranks.gather(answers)
if ranks.is_main:
    print(json.dumps(everyone))
ranks.close()
"""


def test_the_lagged_agreement_gives_every_rank_the_same_answers_one_step_late(tmp_path: Path) -> None:
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    proc = subprocess.Popen([sys.executable, *TORCHRUN_2, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        kill_all(proc)  # on a timeout, the ranks too
    assert proc.returncode == 0, stderr[-3000:]
    rank0, rank1 = json.loads(stdout.strip().splitlines()[-1])
    assert rank0 == rank1
    answers = {tag: flags for flags, tag in rank0[:-1]}
    assert rank0[0] == [[False, False], None]  # nothing asked before step 1
    assert answers[3] == [False, True] and answers[7] == [True, False]  # read after steps 4 and 8
    assert all(flags == [False, False] for tag, flags in answers.items() if tag not in (3, 7))
    assert rank0[-1] == [[True], None]  # blocking, at once


def test_a_torchrun_run_the_tests_kill_leaves_no_rank_behind(tmp_path: Path) -> None:
    """torchrun starts each rank in a session of its own, so killing it, or its process group,
    leaves the ranks running: ``kill_all``, which the tests' clean-up uses, must reach them."""
    script = tmp_path / "sleep.py"
    script.write_text("import time\ntime.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, *TORCHRUN_2, str(script)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(ranks) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            ranks = [pid for pid in descendants(proc.pid) if str(script) in cmdline(pid)]
        assert len(ranks) == 2, "torchrun did not start its two ranks"
    finally:
        kill_all(proc)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in ranks if alive(pid)], "a rank outlived the killed torchrun"


def test_a_rank_with_the_run_directory_at_another_path_resumes_rank_0s_choice(sample_shards: Path,
                                                                              tmp_path: Path) -> None:
    """--out may differ per rank (a node mounts the shared run directory elsewhere).  Rank 1 opens
    the checkpoint rank 0 chose in its own --out: it was told rank 0's path, absent on its node,
    and every rank refused to resume ("every rank must see the same run directory")."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m is not permitted here: needs root with mount rights (CAP_SYS_ADMIN)")
    out, elsewhere, wrapper = tmp_path / "run", tmp_path / "elsewhere", tmp_path / "wrapper.sh"
    rc, first = run_service(sample_shards, out, "--epochs", "1")
    assert rc == 0, first.stderr
    elsewhere.mkdir()
    wrapper.write_text(ELSEWHERE_RANK_1.format(python=sys.executable))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    job = Service(sample_shards, out, "--epochs", "1", launcher=(*TORCHRUN_2, "--no-python"),
                  program=(str(wrapper),), env={"RUN": str(out), "ELSEWHERE": str(elsewhere)})
    try:
        rc = job.wait(timeout=300)
    finally:
        job.kill()
    assert rc == 0, job.stderr[-3000:]
    assert f"resuming run {events(out, 'start')[0]['run_id']}" in job.stdout, job.stdout
    assert events(out, "start", rank=1)[-1]["resumed_from"] == str(elsewhere / "checkpoint-000000006.pt")
