"""How ``tests/docker_stack.py`` (make test-docker) drives and watches the stack: ``make`` as the
user types it (timed), the docker CLI, the trainer container and its state, polling with a
deadline that names what was awaited, Prometheus queries and the run's JSON log.  Apart from the
tests so that those read as the user's flow; like docker_stack.py, never collected by ``make test``."""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = "http://127.0.0.1:9090"
TIMES: dict[str, float] = {}  # what make() and the tests timed; printed at the end


def make(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """``make args`` as the user types it; output kept for the failure message."""
    t0 = time.monotonic()
    env = {**os.environ, "GRAFANA_PASSWORD": "test-docker"}
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    name = " ".join(("make", args[0], *(a for a in args[1:] if a.startswith("GPUS"))))
    TIMES[name + f" ({sum(k.startswith(name) for k in TIMES) + 1})"] = time.monotonic() - t0
    assert result.returncode == 0, (f"make {' '.join(args)}: exit {result.returncode}\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120, check=True).stdout.strip()


def trainer() -> str:
    """The trainer container's id (compose project alexnet, as scripts/stack.sh names it)."""
    ids = docker("ps", "-aq", "--filter", "label=com.docker.compose.project=alexnet",
                 "--filter", "label=com.docker.compose.service=trainer").split()
    assert len(ids) == 1, ids
    return ids[0]


def state(container: str) -> dict:
    return json.loads(docker("inspect", "-f", "{{json .State}}", container))


def wait_for(what: str, check, timeout: float, every: float = 2.0):
    """``check()``'s first truthy value, polled; fails naming ``what`` and the last value after ``timeout`` s."""
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout:.0f} s (last: {value!r})")


def query(expr: str) -> list[dict]:
    url = f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def finite(expr: str) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in query(expr))


def events(run: Path, kind: str) -> list[dict]:
    log = run / "log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return [e for e in map(json.loads, lines) if e.get("event") == kind]


def compose_down() -> None:
    env = {**os.environ, "SHARDS": "/nonexistent", "RUN": "/nonexistent", "GRAFANA_PASSWORD": "unused"}
    subprocess.run(["docker", "compose", "-p", "alexnet", "-f", "docker/compose.yaml", "down", "-v", "--timeout", "60"],
                   cwd=ROOT, env=env, capture_output=True, timeout=180)
