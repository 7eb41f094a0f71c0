"""A service that fails with a diagnosed exit code says it on /metrics before it goes
(``service.app.last_words``): a diverged run (exit 6) stopped the container with Prometheus seeing
only ``up == 0``, the same as a finished run or ``make stop``.  A real service, forced to diverge
with lr 5 as tests/test_service_failures.py does, scraped over real HTTP as Prometheus would."""
from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest

from tests.service_proc import Service


def _exit_code(base: str) -> float | None:
    """``alexnet_exit_code`` of one scrape (None: not exported), or raises OSError once it is gone."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        found = re.search(r"^alexnet_exit_code (\S+)$", r.read().decode(), flags=re.M)
    return float(found.group(1)) if found else None


@pytest.mark.slow
def test_a_diverging_service_tells_its_scraper_exit_6_before_it_goes(sample_shards: Path, tmp_path: Path) -> None:
    exit_file = tmp_path / "exit-code"
    service = Service(sample_shards, tmp_path / "run", "--epochs", "2", "--optim.lr", "5",
                      "--checkpoint.every_steps", "2", env={"ALEXNET_EXIT_FILE": str(exit_file)})
    seen: list[float | None] = []
    try:
        base = service.url()
        while service.proc.poll() is None:  # a scraper every 0.5 s, until the process is gone
            try:
                seen.append(_exit_code(base))
            except OSError:  # closing, or closed
                pass
            time.sleep(0.5)
        rc = service.wait(60)
    finally:
        service.kill()
    assert rc == 6 and exit_file.read_text() == "6\n", service.stderr  # still recorded for the entrypoint
    assert "service: training diverged at step" in service.stderr
    assert seen and seen[0] == 0 and seen[-1] == 6, seen  # 0 while training, 6 in its last answer


@pytest.mark.slow
def test_the_diagnosis_is_said_before_the_wait_for_the_scraper(sample_shards: Path, tmp_path: Path) -> None:
    """The wait for the next scrape (up to 30 s; the stack scrapes every 15 s) came before the
    one-line diagnosis: a person at the terminal saw nothing for that long after a divergence.
    Now the line comes at once; the process waits (scraped once, then not) and goes once scraped."""
    service = Service(sample_shards, tmp_path / "run", "--epochs", "2", "--optim.lr", "5",
                      "--checkpoint.every_steps", "2")
    try:
        base = service.url()
        assert _exit_code(base) == 0  # scraped once: a scraper is watching
        deadline = time.monotonic() + 120
        while "service: training diverged at step" not in service.stderr:
            assert time.monotonic() < deadline and service.proc.poll() is None, service.stderr
            time.sleep(0.2)
        assert service.proc.poll() is None  # said, and still waiting for its scraper
        assert _exit_code(base) == 6
        rc = service.wait(60)
    finally:
        service.kill()
    assert rc == 6 and service.stderr.strip().splitlines()[-1].startswith("service: training diverged"), service.stderr
