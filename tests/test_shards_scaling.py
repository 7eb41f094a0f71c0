"""Issue 14 on a big machine: bounded work in flight, workers writing whole shards, statistics
on every core with the same bytes, a compact ``Source``."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import manifest as contract
from shards.build import build
from shards.config import ShardConfig
from shards.sources import Source
from shards.workers import Workers
from tests.conftest import ROOT
from tests.shards_proc import Sharder


def _started(path: str) -> str:
    with open(path, "a") as f:
        f.write("x\n")
    return path


def test_work_in_flight_is_bounded_by_the_window(tmp_path: Path) -> None:
    """However slowly results are consumed, at most ``window`` tasks are started ahead."""
    log = str(tmp_path / "started")
    with Workers(2, window=3) as workers:
        for consumed, _ in enumerate(workers.imap(_started, [log] * 40), start=1):
            time.sleep(0.01)
            assert len(Path(log).read_text().splitlines()) - consumed <= 3 - 1
    assert len(Path(log).read_text().splitlines()) == 40


@pytest.fixture(scope="module")
def noise_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 incompressible 600x600 images: at size 512 each sample is ~200 KB, 59 MB of shards in all."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("val", 30)):
        for wnid in ("n00000001", "n00000002"):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{i}.JPEG", quality=95)
    return root


def _rss_mb(pid: int) -> float | None:
    try:
        found = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None  # a process that has exited has no RSS


@pytest.mark.slow
def test_parent_memory_stays_flat_with_a_slow_parent(noise_src: Path, tmp_path: Path) -> None:
    """The parent publishes a shard per second, the workers encode far faster: nothing piles up in it.

    Before, every encoded sample went through the parent's result queue: here it grew by 28 MB
    (of 59 MB of shards) while the parent slept; on ImageNet with 32 cores, by 9-17 GB.
    """
    out = tmp_path / "out"
    sharder = Sharder(noise_src, out, "--size", "512", "--shard_samples", "30", "--workers", "2",
                      patches=("--slow", "shards.journal:Journal.append=1.0"))
    rss: list[float] = []  # MB, from the first published shard to the end of writing

    def sample() -> None:
        while (now := _rss_mb(sharder.proc.pid)) is not None:
            published = any(line.startswith("slow:") for line in sharder.lines)
            if published and not any("dataset statistics" in line for line in sharder.lines):
                rss.append(now)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    assert sharder.wait(timeout=120) == 0, "\n".join(sharder.errors)
    sampler.join()
    shard_mb = sum(p.stat().st_size for p in out.rglob("*.tar")) / 2**20
    assert len(rss) > 100 and shard_mb > 50
    assert max(rss) - rss[0] < 8, f"parent RSS grew from {rss[0]:.0f} to {max(rss):.0f} MB while writing"


def test_statistics_use_every_worker(sample_src: Path, tmp_path: Path) -> None:
    """One training shard (the default 5,000 samples) used to be one statistics task, on one worker."""
    pids = tmp_path / "pids"
    sharder = Sharder(sample_src, tmp_path / "out", "--workers", "2", "--chunk", "8",
                      patches=("--pids", f"shards.stats:PixelMoments.add={pids}"))
    assert sharder.wait(timeout=120) == 0, "\n".join(sharder.errors)
    assert len(contract.load(tmp_path / "out").splits["train"].shards) == 1
    assert len(set(pids.read_text().split())) == 2


def test_statistics_bytes_do_not_depend_on_workers_or_chunks(sample_src: Path, tmp_path: Path) -> None:
    """Integer sums: any split of the images gives the same bytes, which are the old float64 method's."""
    files = {}
    for name, workers, chunk in (("one", 1, 1000), ("three", 3, 5)):
        out = tmp_path / name
        build(ShardConfig(src=sample_src, out=out, shard_samples=7, workers=workers, chunk=chunk,
                          stats_images=50).validate())
        files[name] = [(out / f).read_bytes() for f in ("stats.json", "mean_image.npy")]
    assert files["one"] == files["three"]
    import webdataset as wds

    urls = [str(s.tar) for s in contract.load(tmp_path / "one").splits["train"].shards]
    sum_image = np.zeros((256, 256, 3))
    for _, sample in zip(range(50), wds.WebDataset(urls, shardshuffle=False)):
        sum_image += np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
    buf = io.BytesIO()
    np.save(buf, (sum_image / 50).astype(np.float32))
    assert files["one"][1] == buf.getvalue()
    assert json.loads(files["one"][0])["images"] == 50


def test_shards_are_planned_by_input_position(tmp_path: Path) -> None:
    """Shard k holds the usable images among positions [k*N, (k+1)*N); a run of unusable ones gives no tar."""
    from shards.build import ordered
    from shards.layouts import scan

    src = tmp_path / "src"
    for split in ("train", "val"):
        (src / split / "n00000001").mkdir(parents=True)
    Image.new("RGB", (300, 300), (10, 200, 30)).save(src / "val" / "n00000001" / "v.JPEG")
    for i in range(12):
        Image.new("RGB", (300, 300), (i * 20, 100, 50)).save(src / "train" / "n00000001" / f"img_{i:02d}.JPEG")
    order = ordered(scan(src), "train", seed=0)  # the shuffle does not look at the bytes
    for position in (2, 3, 7):
        Path(order[position].path).write_bytes(b"")
    out = tmp_path / "out"
    record = build(ShardConfig(src=src, out=out, shard_samples=2, workers=2, max_skipped_fraction=0.5).validate())
    shards = record["splits"]["train"]["shards"]
    assert [s["tar"] for s in shards] == [f"train-{k:06d}.tar" for k in range(5)]
    keys = []
    for shard in shards:
        lines = (out / "train" / shard["index"]).read_text().splitlines()[1:]
        keys.append([int(line.split()[3].split(".")[0].split("-")[1]) for line in lines])
    assert keys == [[0, 1], [4, 5], [6], [8, 9], [10, 11]]
    assert [s["path"] for s in record["skipped"]] == [order[p].path for p in (2, 3, 7)]


def test_source_is_compact() -> None:
    """ImageNet has 1.33M sources in the parent: no per-instance ``__dict__``."""
    source = Source("train", "n00000001", "/data/train/n00000001/x.JPEG")
    assert not hasattr(source, "__dict__")
    assert os.path.basename(source.path) == "x.JPEG"


def test_workers_0_means_one_per_core_the_process_may_run_on() -> None:
    """In a container limited to a few of the host's cores (a cpuset, ``taskset``), ``--workers 0``
    starts one process per core it may use, not one per core of the host."""
    code = ("import os; from pathlib import Path; from shards.config import ShardConfig; "
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "print(ShardConfig(src=Path('src'), out=Path('out')).processes)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "1", done.stderr
