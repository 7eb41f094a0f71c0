"""Progress reports: a bar on a terminal, plain lines in a redirected log (``common.progress``)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from common.progress import LineProgress, progress

ROOT = Path(__file__).resolve().parents[1]


def _run_redirected(log: Path, module: str, *args: str) -> str:
    """``python -m module args`` with stdout and stderr going to a file, as in ``make shards > log 2>&1``."""
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       stdout=out, stderr=subprocess.STDOUT, check=True, timeout=300)
    return log.read_bytes().decode()  # read_text would turn "\r" into "\n"


def test_redirected_logs_get_lines_not_bar_redraws(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "shards"
    text = _run_redirected(tmp_path / "sample.log", "sampledata", "--out", str(src), "--classes", "2",
                           "--train_per_class", "6", "--val_per_class", "2")
    text += _run_redirected(tmp_path / "shards.log", "shards", "--src", str(src), "--out", str(out),
                            "--shard_samples", "4", "--workers", "1")
    assert "\r" not in text and "\x1b[" not in text, repr(text)
    assert "sample images: 16/16 img (100%)" in text and "shards: 16/16 img (100%)" in text


def test_line_progress_reports_every_interval_and_at_the_end() -> None:
    sink = io.StringIO()
    with LineProgress(total=10, desc="work", unit="img", initial=2, file=sink, every_seconds=0) as bar:
        bar.update(3)
        bar.update(5)
    lines = sink.getvalue().splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["work: 5/10 img (50%)", "work: 10/10 img (100%)",
                                                  "work: 10/10 img (100%)"]
    assert "ETA" in lines[0] and lines[-1].endswith(" s") and "ETA" not in lines[-1]
    quiet = io.StringIO()
    with LineProgress(total=10, desc="work", unit="img", initial=0, file=quiet, every_seconds=3600) as bar:
        bar.update(10)
    assert len(quiet.getvalue().splitlines()) == 1  # only the final line within the interval


def test_a_terminal_gets_a_tqdm_bar() -> None:
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        bar = progress(5, "work", file=terminal)
        assert isinstance(bar, tqdm)
        bar.close()
    os.close(leader)
