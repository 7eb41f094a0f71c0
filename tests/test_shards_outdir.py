"""The output directory: one run at a time, and never the images it reads."""
from __future__ import annotations

from pathlib import Path

from shards import manifest as contract
from tests.conftest import run_module
from tests.shards_proc import Sharder

ARGS = ("--shard_samples", "6", "--workers", "1")


def test_a_second_run_into_the_same_out_stops_with_a_line(sample_src: Path, tmp_path: Path) -> None:
    """Two runs into one --out removed each other's temp files and shards at their resume step
    and both ended in a FileNotFoundError traceback; now the second stops before touching it."""
    out = tmp_path / "out"
    first = Sharder(sample_src, out, *ARGS, patches=("--slow", "shards.write_split:_encode=0.02"))
    first.wait_for("slow: shards.write_split:_encode")
    second = run_module("shards", "--src", str(sample_src), "--out", str(out), *ARGS, check=False)
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"another sharder is writing to {out}" in second.stderr.strip().splitlines()[-1]
    assert first.wait(timeout=120) == 0, "\n".join(first.errors)
    m = contract.load(out, deep=True)
    assert m.splits["train"].samples + m.splits["val"].samples == m.record["written"] > 0
