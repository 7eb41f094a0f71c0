"""Every metric the Grafana dashboard and the alerting rules query is one the service really
exports, used as its type allows (rate() of a counter or a histogram's parts, never of a gauge;
histogram_quantile over ``le``) and with labels it has (or the target labels of prometheus.yml).

Checked against a live /metrics scrape of ``python -m service`` training on the sample shards
(not against a list typed in here), then the service is stopped with SIGTERM, as `make stop` does.
A misspelt name, a label the series lacks or rate() of a gauge is no error in PromQL: the panel
shows nothing, or nonsense, and the rule never fires.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service_proc import free_port
from tests.test_alerts import rules

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "alexnet.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "info": ("_info",)}
TINY = """# A short CPU run: small batches, one-view evaluation, a log line every step.
eval_views = 1
log_every = 1
[loader]
batch_size = 16
[model]
bias_init = 0.1
"""


TARGET_LABELS = {"job", "instance", "rank"}  # prometheus.yml's, on every series it scrapes
SERVICE_SERIES = r"\b(?:alexnet|process|python)_[A-Za-z0-9_]+"  # what the service exports (not up, ALERTS, DCGM_*)
COUNTER_ONLY = ("rate", "irate", "increase", "resets")  # of a gauge: meaningless (any dip reads as a reset)
GAUGE_ONLY = ("delta", "idelta", "deriv", "predict_linear")  # of a counter: wrong at every restart


def dashboard_metrics() -> set[str]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    return {m for e in exprs for m in re.findall(r"\balexnet_[A-Za-z0-9_]+", e)}


def queries() -> list[tuple[str, str, set[str]]]:
    """(where, PromQL, the labels its legend or annotations name) of every dashboard target and rule."""
    found = [(f"panel {p['title']!r}", t["expr"], set(re.findall(r"{{\s*(\w+)\s*}}", t.get("legendFormat", ""))))
             for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    return found + [(f"alert {r['alert']}", r["expr"], set(re.findall(r"\$labels\.(\w+)", json.dumps(r))))
                    for r in rules()]


def series_kinds(text: str) -> dict[str, tuple[str, set[str] | None]]:
    """Series name -> (its family's type, its label names; None when it has no sample to show them)."""
    kinds: dict[str, tuple[str, set[str] | None]] = {}
    for family in text_string_to_metric_families(text):
        for name in {family.name, *(family.name + s for s in SUFFIXES.get(family.type, ()))}:
            kinds[name] = (family.type, None)
        for sample in family.samples:
            known = kinds[sample.name][1] or set()
            kinds[sample.name] = (family.type, known | set(sample.labels))
    return kinds


def misuses(where: str, expr: str, legend: set[str], kinds: dict[str, tuple[str, set[str] | None]]) -> list[str]:
    """What is wrong in ``expr`` against the exported ``kinds``: names, types, labels."""
    used = re.findall(SERVICE_SERIES, expr)
    wrong = [f"{where}: {n} is not exported" for n in used if n not in kinds]
    for func, name in re.findall(r"\b(\w+)\(\s*(" + SERVICE_SERIES + ")", expr):
        kind = kinds.get(name, ("?", None))[0]
        if func in COUNTER_ONLY and kind not in ("counter", "histogram", "summary"):
            wrong.append(f"{where}: {func}() of {name}, a {kind}")
        if func in GAUGE_ONLY and kind != "gauge":
            wrong.append(f"{where}: {func}() of {name}, a {kind}")
    if "histogram_quantile" in expr and not re.search(r"\bby \([^)]*\ble\b", expr):
        wrong.append(f"{where}: histogram_quantile without le in its grouping")
    labels = set(TARGET_LABELS)
    for name in used:
        have = kinds.get(name, ("?", None))[1]
        labels |= have if have is not None else {"*"}  # a family with no sample yet (the GPU gauges on a CPU)
    named = {lbl for sel in re.findall(SERVICE_SERIES + r"\{([^}]*)\}", expr) for lbl in re.findall(r"(\w+)\s*!?[=~]", sel)}
    named |= {lbl for group in re.findall(r"\b(?:by|on|without|ignoring) \(([^)]*)\)", expr)
              for lbl in re.findall(r"\w+", group)}
    if used and "*" not in labels:
        wrong += [f"{where}: label {lbl} is on none of {sorted(set(used))}" for lbl in sorted((named | legend) - labels)]
    return wrong


def exported(text: str) -> tuple[set[str], dict[str, float]]:
    """The series names an exposition declares (a histogram's _bucket/_sum/_count...) and its unlabelled values."""
    names, values = set(), {}
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + s for s in SUFFIXES.get(family.type, ()))
        for sample in family.samples:
            names.add(sample.name)
            if not sample.labels:
                values[sample.name] = sample.value
    return names, values


@pytest.mark.slow
def test_dashboard_queries_only_metrics_the_service_exports(sample_shards: Path, tmp_path: Path) -> None:
    wanted = dashboard_metrics()
    assert len(wanted) >= 15, wanted
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    port = free_port()
    log = (tmp_path / "service.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--config", str(config), "--shards", str(sample_shards),
         "--out", str(tmp_path / "run"), "--epochs", "50", "--http.host", "127.0.0.1", "--http.port", str(port)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
    text = ""
    try:
        # Scrape once the first evaluation is in (every lazily created metric exists by then), or
        # after 5 minutes with what there is: the comparison below then names what is missing.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the service exited:\n" + (tmp_path / "service.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                time.sleep(1)
                continue
            values = exported(text)[1]
            if values.get("alexnet_val_top1_error", 0) > 0 and values.get("alexnet_eval_duration_seconds", 0) > 0:
                break
            time.sleep(1)
        names, _ = exported(text)
        assert wanted <= names, (f"the dashboard queries metrics the service does not export: {sorted(wanted - names)}"
                                 f"\n/metrics:\n{text[:3000]}")
        kinds = series_kinds(text)
        wrong = [w for where, expr, legend in queries() for w in misuses(where, expr, legend, kinds)]
        assert wrong == [], "\n".join(wrong)
        evaluated = exported(text)[1].get("alexnet_eval_duration_seconds", 0)
        assert evaluated > 0, f"no evaluation's wall time after the first evaluation (or 300 s):\n{text[:3000]}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.close()
    assert code == 0, "SIGTERM: the service must checkpoint and exit 0 within 30 s (compose's stop_grace_period)"


def test_the_dashboard_shows_every_series_an_alert_watches() -> None:
    """Someone paged by a rule opens the dashboard to see how bad it is and since when."""
    watched = {m for r in rules() for m in re.findall(r"\balexnet_[A-Za-z0-9_]+", r["expr"])}
    assert watched <= dashboard_metrics(), f"alerts on series no panel shows: {sorted(watched - dashboard_metrics())}"
