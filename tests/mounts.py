"""A real tmpfs for the tests that need a small or read-only file system (a full disk, a run
directory nobody may write).  Root ignores permission bits, so a mount is the honest way to
make writes fail; where mounting is not permitted the test is skipped, saying why."""
from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """``path`` (created) with a tmpfs mounted on it (``mount -o options``), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs ({options}) is not permitted here ({done.stderr.strip()}): needs root "
                    "with mount rights (CAP_SYS_ADMIN in a container)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
