"""What the dashboard's panels show across a restart and over a long run, evaluated by the real
promtool (``promql_expr_test``) on synthetic series, with each panel's PromQL read from the
dashboard: a query that takes a counter's raw value rather than its increase shows a lifetime
figure that hides what changed lately, and nothing at all after every restart."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.prometheus_bin import binaries, skip_reason
from tests.test_docker_metrics import DASHBOARD

FOUND = binaries()
pytestmark = pytest.mark.skipif(FOUND is None, reason=skip_reason())


def panel_expr(title: str) -> str:
    (expr,) = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"] == title
               for t in p["targets"]]
    return expr


def promtool_test(tmp_path: Path, tests: list[dict]) -> subprocess.CompletedProcess:
    spec = tmp_path / "dashboard_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": tests}))
    return subprocess.run([FOUND[1], "test", "rules", str(spec)], capture_output=True, text=True, timeout=120)


def test_checkpoint_duration_is_the_last_hours_mean_through_a_restart(tmp_path: Path) -> None:
    """A day of 1 s checkpoints (one a minute here), then the disk slows: an hour of 10 s ones;
    then the trainer restarts and has written none yet.  The panel took sum(_sum) / sum(_count):
    1.36 s after the slow hour (the day's mean), and NaN after the restart (0 / 0)."""
    expr, rank0 = panel_expr("Checkpoint duration (mean)"), '{job="alexnet", instance="127.0.0.1:9431", rank="0"}'
    series = [{"series": "alexnet_checkpoint_duration_seconds_sum" + rank0, "values": "0+1x1440 1450+10x58 _x2 0x10"},
              {"series": "alexnet_checkpoint_duration_seconds_count" + rank0, "values": "0+1x1499 _x2 0x10"}]
    result = promtool_test(tmp_path, [{"interval": "1m", "input_series": series, "promql_expr_test": [
        {"expr": expr, "eval_time": "1499m", "exp_samples": [{"labels": "{}", "value": 10}]},
        {"expr": expr, "eval_time": "1505m", "exp_samples": [{"labels": "{}", "value": 10}]}]}])
    assert result.returncode == 0, f"{expr}:\n{result.stdout}{result.stderr}"
