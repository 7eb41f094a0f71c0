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


def _tiny_src(root: Path) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        (root / split / "n00000001").mkdir(parents=True)
        Image.new("RGB", (300, 300), (10, 200, 30)).save(root / split / "n00000001" / "a.JPEG")
    return root


def test_an_out_that_is_a_file_or_the_image_tree_is_refused_with_a_line(tmp_path: Path) -> None:
    """--out = a file ended in a FileExistsError traceback; --out = --src wrote the shards among
    the images, and each re-run counted them as skipped inputs and rebuilt everything."""
    src = _tiny_src(tmp_path / "src")
    (tmp_path / "file").write_text("x")
    for out, says in ((tmp_path / "file", "is a file, not a directory"),
                      (src, "would write its train/ shards inside"),
                      (src / "train" / "shards", "would write its train/ shards inside")):
        done = run_module("shards", "--src", str(src), "--out", str(out), "--workers", "1", check=False)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert says in done.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in (src / "train").iterdir()) == ["n00000001"], "nothing was written among the images"
    beside = run_module("shards", "--src", str(src), "--out", str(src / "shards"), "--workers", "1", check=False)
    assert beside.returncode == 0, beside.stderr


def test_a_write_of_the_sharder_itself_that_fails_ends_in_one_line(tmp_path: Path) -> None:
    """The parent's own writes (journal, statistics, manifest) failing, as on a full disk, ended
    in a traceback (the workers' writes already gave one line).  A directory where stats.json
    goes fails the same way, without a small file system to fill."""
    src = _tiny_src(tmp_path / "src")
    out = tmp_path / "out"
    (out / "stats.json").mkdir(parents=True)
    done = run_module("shards", "--src", str(src), "--out", str(out), "--workers", "1", check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("shards: error: ") and "stats.json" in line and "re-run the same command" in line
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()


def test_a_finished_directory_on_a_read_only_mount_is_still_reverified(tmp_path: Path) -> None:
    """The run's lock file cannot be created on a read-only mount; a re-run there (shards shared
    read-only, re-checked by the same command) said 'nothing to do' before the lock existed and
    must still, instead of failing on the lock file."""
    import os
    import subprocess

    import pytest

    src = _tiny_src(tmp_path / "src")
    out, mnt = tmp_path / "rw", tmp_path / "ro"
    run_module("shards", "--src", str(src), "--out", str(out / "o"), "--workers", "1")
    (out / "o" / ".sharding.lock").unlink()
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(out), str(mnt)], capture_output=True).returncode:
        pytest.skip("needs root to make a read-only bind mount")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True, capture_output=True)
        done = run_module("shards", "--src", str(src), "--out", str(mnt / "o"), "--workers", "1", check=False)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert done.returncode == 0, done.stderr
    assert "is complete and unchanged; nothing to do" in done.stdout
