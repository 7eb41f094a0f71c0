"""A real Prometheus server scrapes a running service (Debian's ``prometheus`` package: ``.ci/run``
installs it); its query API must see the images counter grow, ``promtool check metrics`` must be
clean on a live scrape, and /healthz and /status must answer while the loop trains."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.service_proc import Service, free_port

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None,
                       reason="needs Debian's prometheus package (apt-get install prometheus; .ci/run installs it)"),
]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _query(base: str, promql: str) -> list[dict]:
    answer = json.loads(_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _start_prometheus(target: str, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
                      f"  - job_name: alexnet\n    static_configs:\n      - targets: ['{target}']\n"
                      "        labels: {rank: '0'}\n")
    port = free_port()
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "prometheus.log", "w"))
    return proc, f"http://127.0.0.1:{port}"


def _wait_for_rate(base: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = _query(base, "rate(alexnet_train_images_total[10s])")
        except OSError:  # Prometheus still starting
            result = []
        if result and float(result[0]["value"][1]) > 0:
            return float(result[0]["value"][1])
        time.sleep(1)
    raise AssertionError(f"Prometheus never saw the images counter grow within {timeout} s")


def test_prometheus_scrapes_a_training_service(sample_shards: Path, tmp_path: Path) -> None:
    service = Service(sample_shards, tmp_path / "run", "--epochs", "20")
    prometheus = None
    try:
        base = service.url()
        prometheus, prom = _start_prometheus(base.removeprefix("http://"), tmp_path)
        service.wait_for(r"epoch 1 step 1/6")
        lint = subprocess.run([PROMTOOL, "check", "metrics"], input=_get(base + "/metrics"), capture_output=True,
                              text=True)
        assert lint.returncode == 0 and lint.stdout + lint.stderr == "", lint.stdout + lint.stderr
        assert _get(base + "/healthz").startswith("ok")
        status = json.loads(_get(base + "/status"))
        assert status["phase"] in ("training", "checkpointing") and status["global_batch"] == 24
        assert {"run_id", "epoch", "step", "images_per_s", "loss", "lr", "last_checkpoint",
                "last_evaluation", "heartbeat_age_seconds"} <= set(status)

        assert 0 < _wait_for_rate(prom, timeout=120) < 10_000
        info = _query(prom, "alexnet_build_info")
        assert info[0]["metric"]["layout"] == "grouped" and info[0]["metric"]["rank"] == "0"
        assert _query(prom, "alexnet_samples_failed_total")[0]["value"][1] == "0"
        service.signal()
        assert service.wait(timeout=60) == 0, service.stderr
    finally:
        service.kill()
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
