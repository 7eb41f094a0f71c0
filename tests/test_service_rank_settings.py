"""The ranks of one torchrun job must run the same settings: a rank started with other flags (a
wrapper script that adds some on one rank, a node with another config file) used to hang every
rank in a collective (``--epochs``, ``--fresh``), abort rank 0 in gloo, or exit 0 with replicas
that silently differ (``--optim.lr``).  Now every rank refuses at start, exit 2, before anything
is deleted or trained, rank 0's line naming each key that differs."""
from __future__ import annotations

import dataclasses
import stat
import sys
from pathlib import Path

import pytest

from service.config import HttpSettings, TrainConfig
from tests.service_proc import TORCHRUN_2, Service

pytestmark = pytest.mark.slow
# The reviewer's wrapper: rank 1 alone gets $RANK1_FLAGS.  It keeps each rank's exit code and
# stderr apart (torchrun itself exits 1 whatever its ranks did).  It ignores SIGTERM: torchrun
# sends one to the workers left when a rank fails, and rank 0's wrapper, whose python had already
# said why and exited 2, died of it before writing rc0 (the service sets its own handler).
WRAPPER = """#!/bin/sh
trap '' TERM
extra=""
[ "$RANK" = 1 ] && extra="$RANK1_FLAGS"
{python} -m service "$@" $extra 2>"{dir}/stderr$RANK"
code=$?
cat "{dir}/stderr$RANK" >&2
echo $code > "{dir}/rc$RANK"
exit $code
"""
HINT = "start every rank with the same command line and config"


def start_job(shards: Path, out: Path, rank_dir: Path, rank1: tuple[str, ...], *args: str) -> Service:
    """torchrun, 2 gloo ranks, each through the wrapper; rank 1 gets ``rank1`` on top of ``args``."""
    rank_dir.mkdir()
    wrapper = rank_dir / "wrapper.sh"
    wrapper.write_text(WRAPPER.format(python=sys.executable, dir=rank_dir))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return Service(shards, out, *args, launcher=(*TORCHRUN_2, "--no-python"), program=(str(wrapper),),
                   env={"RANK1_FLAGS": " ".join(rank1)})


@pytest.mark.parametrize("both, rank1, named", [
    ((), ("--optim.lr", "0.05"), "optim.lr 0.05 (rank 0: 0.01)"),  # was: exit 0, replicas silently apart
    ((), ("--epochs", "2"), "epochs 2 (rank 0: 1)"),  # was: both ranks hung after epoch 1
    ((), ("--fresh", "true"), "fresh true (rank 0: false)"),  # was: a hang at start
    (("--fresh", "true"), ("--fresh", "false"), "fresh false (rank 0: true)"),  # was: rank 0 deleted, then hung
], ids=["lr", "epochs", "fresh-rank1", "fresh-rank0"])
def test_ranks_with_different_settings_refuse_to_start(sample_shards: Path, tmp_path: Path, both: tuple[str, ...],
                                                       rank1: tuple[str, ...], named: str) -> None:
    out, ranks = tmp_path / "run", tmp_path / "ranks"
    out.mkdir()
    previous = [out / "checkpoint-000000006.pt.corrupt", out / "ids.jsonl"]
    for path in previous:  # an earlier run's files that --fresh deletes: neither rank may, now
        path.write_text("from the previous run\n")
    job = start_job(sample_shards, out, ranks, rank1, "--epochs", "1", *both)
    try:
        rc = job.wait(timeout=90)  # the check comes before training: seconds (the old hangs: gloo's 30 min)
    finally:
        job.kill()
    assert rc == 1, job.stderr  # torchrun's: a rank failed
    codes = [(ranks / f"rc{rank}").read_text().strip() for rank in (0, 1)]
    lines = [(ranks / f"stderr{rank}").read_text().splitlines() for rank in (0, 1)]
    assert codes == ["2", "2"], lines
    said = [[line for line in rank if line.startswith("service:")] for rank in lines]
    assert len(said[0]) == 1 and len(said[1]) == 1, lines
    assert said[0][0] == f"service: rank 1's settings differ from rank 0's: {named}; {HINT}"
    assert said[1][0].startswith("service: rank 1: ") and named.split()[0] in said[1][0]
    assert not any("Traceback" in line for rank in lines for line in rank)
    assert all(path.read_text() == "from the previous run\n" for path in previous)


def test_what_may_differ_per_rank_and_what_may_not(tmp_path: Path) -> None:
    """Paths, the HTTP endpoint, each rank's own device and its host threads may differ; the data
    may not, nor any other setting.  (``compared`` takes a resolved config: ``device`` is this rank's.)"""
    from service.rank_settings import compared, described

    rank0 = TrainConfig(shards=Path("/node0/shards"), out=Path("/node0/run"), device="cuda:0")
    rank1 = TrainConfig(shards=Path("/mnt/shards"), out=Path("/mnt/run"), device="cuda:1")
    rank1 = dataclasses.replace(rank1, http=HttpSettings(host="10.0.0.2", port=9500), cuda_sync="spin",
                                loader=dataclasses.replace(rank1.loader, threads=32, prefetch=4, affinity="spare_core"))
    assert described([compared(rank0, "abcd"), compared(rank1, "abcd")]) is None
    other = TrainConfig(shards=Path("/mnt/shards"), device="cpu", seed=7)
    text = described([compared(rank0, "abcd"), compared(rank1, "abcd"), compared(other, "ef01")])
    assert text == ("rank 2's settings differ from rank 0's: the data of shards /mnt/shards (data fingerprint ef01; "
                    "rank 0's /node0/shards: abcd), device cpu (rank 0: cuda), seed 7 (rank 0: 0)"), text
