"""The stack's alerting rules (docker/prometheus/alerts.yml), checked by the real promtool of the
series compose pins: valid, loaded by prometheus.yml, each rule firing and staying quiet as
tests/alerts_test.yml says, and every ``alexnet_*`` metric they name one the service registers
(a misspelt name is no error in PromQL: the rule would simply never fire)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from service.metrics import ServiceMetrics, build_labels
from tests.prometheus_bin import binaries, skip_reason

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"
UNIT_TESTS = ROOT / "tests" / "alerts_test.yml"
FOUND = binaries()
needs_promtool = pytest.mark.skipif(FOUND is None, reason=skip_reason())


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def alert_metrics() -> set[str]:
    """The ``alexnet_*`` series the rules query."""
    return {m for r in rules() for m in re.findall(r"\balexnet_[A-Za-z0-9_]+", r["expr"])}


@needs_promtool
def test_the_rules_pass_promtool_and_prometheus_yml_loads_them() -> None:
    check = subprocess.run([FOUND[1], "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS: 10 rules found" in check.stdout, check.stdout + check.stderr
    config = yaml.safe_load((ALERTS.parent / "prometheus.yml").read_text())
    assert config["rule_files"] == [ALERTS.name]  # next to it, in the repository and in the container
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert f"./prometheus/{ALERTS.name}:/etc/prometheus/{ALERTS.name}:ro" in compose["services"]["prometheus"]["volumes"]


@needs_promtool
def test_each_rule_fires_when_it_should_and_only_then() -> None:
    result = subprocess.run([FOUND[1], "test", "rules", str(UNIT_TESTS)], capture_output=True, text=True,
                            timeout=120, cwd=UNIT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fired = {c["alertname"] for t in tested for c in t["alert_rule_test"] if c["exp_alerts"]}
    quiet = {c["alertname"] for t in tested for c in t["alert_rule_test"] if not c["exp_alerts"]}
    names = {r["alert"] for r in rules()}
    assert fired == names and quiet == names, "every rule needs a case where it fires and one where it does not"


def test_every_metric_the_rules_query_is_registered() -> None:
    wanted = alert_metrics()
    assert len(wanted) >= 5, wanted
    text = generate_latest(ServiceMetrics(build_labels("cpu", "grouped", 1)).registry).decode()
    declared = set(re.findall(r"^# TYPE (\S+) (\S+)", text, flags=re.M))
    names = {n for n, _ in declared}
    names |= {n + s for n, kind in declared if kind == "histogram" for s in ("_sum", "_count", "_bucket")}
    assert wanted <= names, f"the rules query series the service does not export: {sorted(wanted - names)}"
