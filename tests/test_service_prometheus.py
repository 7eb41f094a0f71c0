"""A real Prometheus server, of the series docker/compose.yaml pins (tests/prometheus_bin.py fetches
it; make test and .ci/run run that), scrapes a running service; its query API must see the images
counter grow and answer every query of the Grafana dashboard with data (as make test-docker does
in Docker), ``promtool check metrics`` must be clean on a live scrape, /healthz and /status must
answer while the loop trains, and the stack's alerting rules must evaluate without error, none firing."""
from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.docker_stack import DASHBOARD, GPU_PANELS
from tests.test_alerts import ALERTS, rules
from tests.prometheus_bin import binaries, skip_reason
from tests.service_proc import Service, free_port

PROMETHEUS, PROMTOOL = binaries() or (None, None)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(PROMETHEUS is None, reason=skip_reason())]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _query(base: str, promql: str) -> list[dict]:
    answer = json.loads(_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _start_prometheus(target: str, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
                      f"rule_files: ['{ALERTS}']\nscrape_configs:\n"
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


def _wait_for_dashboard_data(base: str, timeout: float) -> None:
    """Every query of the dashboard (the GPU panels excepted) answers with a finite value: the
    PromQL the user's Grafana sends, against the Prometheus series the stack runs."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = {f"{p['title']}: {t['expr']}": t["expr"] for p in panels if p["title"] not in GPU_PANELS
               for t in p["targets"]}
    assert len(queries) >= 15, queries
    deadline = time.monotonic() + timeout
    while missing := [k for k, e in queries.items()
                      if not any(math.isfinite(float(r["value"][1])) for r in _query(base, e))]:
        assert time.monotonic() < deadline, f"dashboard queries without data from Prometheus: {missing}"
        time.sleep(2)


def _assert_rules_evaluate_and_none_fires(base: str) -> None:
    """The stack's alerting rules, evaluated by Prometheus against the live series: no evaluation
    error, and nothing firing in a healthy run."""
    loaded = [r for g in json.loads(_get(f"{base}/api/v1/rules"))["data"]["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in loaded) == sorted(r["alert"] for r in rules())
    assert all(r["health"] == "ok" and not r.get("lastError") for r in loaded), loaded
    assert _query(base, 'ALERTS{alertstate="firing"}') == []


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
        _wait_for_dashboard_data(prom, timeout=180)  # the last values: an evaluation and a checkpoint
        _assert_rules_evaluate_and_none_fires(prom)
        service.signal()
        assert service.wait(timeout=60) == 0, service.stderr
    finally:
        service.kill()
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)


def test_prometheus_says_why_a_diverged_trainer_is_down(sample_shards: Path, tmp_path: Path) -> None:
    """lr 5 diverges within the first epoch (exit 6).  Prometheus, scraping from before the service
    answers, must then fire AlexNetDiverged from the stack's rules, and nothing else: before, it
    saw only ``up == 0`` (AlexNetRankDown, 2 minutes later, "crashed, stopped or finished")."""
    port = free_port()
    prometheus, prom = _start_prometheus(f"127.0.0.1:{port}", tmp_path)
    service = Service(sample_shards, tmp_path / "run", "--epochs", "2", "--optim.lr", "5",
                      "--checkpoint.every_steps", "2", "--http.port", str(port))
    try:
        assert service.wait(timeout=240) == 6, service.stderr
        deadline, firing = time.monotonic() + 60, []
        while not firing and time.monotonic() < deadline:
            firing = _query(prom, 'ALERTS{alertstate="firing"}')
            time.sleep(1)
        assert [a["metric"]["alertname"] for a in firing] == ["AlexNetDiverged"], firing
        assert _query(prom, "up")[0]["value"][1] == "0"
    finally:
        service.kill()
        prometheus.terminate()
        prometheus.wait(timeout=30)
