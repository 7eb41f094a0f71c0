"""make test-docker: the user's Docker flow on the sample data, for real, on the CPU (GPUS=none).

Run by scripts/test-docker.sh, which provides the engine, compose v2 and the images the stack does
not build (stand-ins where no registry answers); `make test` never collects this file (its name
does not start with test_), so it never starts Docker.  The tests run in order on one stack:
make shards-docker (builds the image), make train GPUS=none, then what the user would look at.
Fixed ports, as the stack has: 9431 (trainer), 9090 (Prometheus), 3000 (Grafana).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from sampledata.generate import SampleConfig, generate
from tests.docker_tools import (PROMETHEUS, ROOT, TIMES, compose_down, docker, events, finite, make, query, state,
                                trainer, wait_for)
from tests.prometheus_bin import pinned_series
from tests.test_alerts import rules as alert_rules
from tests.test_docker import seconds
from tests.test_docker_metrics import TINY

# compose.yaml's stop_grace_period: a stop that took longer was SIGKILLed.  (A bound of 30 s failed
# at 31.6 s at load 6 on 2 cores, the trainer having checkpointed and exited 0.)
GRACE = seconds(yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]["trainer"]["stop_grace_period"])
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "alexnet.json"
GPU_PANELS = {"GPU utilisation", "GPU memory", "GPU power"}  # NVIDIA's dcgm-exporter and CUDA memory only
# A short CPU run that never finishes: 9 steps per epoch over 144 images, a 1-view evaluation and
# a checkpoint (~450 MB) at each epoch end, only the newest kept.
CONFIG = "epochs = 1000\n" + TINY + "[checkpoint]\nkeep = 1\n"
PASSWORD = "te$t-$(docker) #1"  # on make's command line, which expanded the '$'s
# Paths as users name them, a run for its start: -v SRC:DEST split them at the ':' (Docker refused them).
SHARDS, RUN = "shards, sample: 6 classes", "run 2026-12-02T04:30"


@pytest.fixture(scope="module")
def work():
    """Sample data, its shards (make shards-docker) and the tiny config, in data/docker-test/e2e."""
    for port in (9431, 9090, 3000):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} is in use on 127.0.0.1: the stack listens there; stop what uses it")
    base = ROOT / "data" / "docker-test" / "e2e"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    generate(SampleConfig(out=base / "sample", classes=6, train_per_class=24, val_per_class=6, seed=1))
    (base / "tiny.toml").write_text(CONFIG)
    yield base
    compose_down()
    shutil.rmtree(base, ignore_errors=True)
    print("\ntest-docker timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in TIMES.items()))


def test_shards_docker_builds_the_image_and_shards(work: Path) -> None:
    make("shards-docker", f"SRC={work / 'sample'}", f"OUT={work / SHARDS}", "ARGS=--shard_samples 20")
    manifest = json.loads((work / SHARDS / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 144 and manifest["splits"]["val"]["samples"] == 36
    assert docker("image", "inspect", "-f", "{{.Config.User}}", "alexnet2012:latest") == "10001:10001"  # non-root


def test_torch_compile_runs_in_the_image(work: Path) -> None:
    """model.compile (configs/paper.toml sets it) compiles at run time; without a C++ compiler in the
    image it failed with InvalidCxxCompiler and the entrypoint restarted the trainer 5 times."""
    code = "import torch; f = torch.compile(lambda x: x.sin() + 1); print(f(torch.zeros(3)).tolist())"
    result = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python", "alexnet2012:latest", "-c", code],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "[1.0, 1.0, 1.0]", result.stderr[-3000:]


@pytest.fixture(scope="module")
def stack(work: Path) -> Path:
    """make train GPUS=none on the sample shards; the run directory."""
    make("train", "GPUS=none", f"SHARDS={work / SHARDS}", f"RUN={work / RUN}", f"CONFIG={work / 'tiny.toml'}",
         f"GRAFANA_PASSWORD={PASSWORD}")
    return work / RUN


def test_trainer_is_healthy_and_not_root(stack: Path) -> None:
    t0 = time.monotonic()
    wait_for("the trainer healthy", lambda: state(trainer()).get("Health", {}).get("Status") == "healthy", 300)
    TIMES["healthy after"] = time.monotonic() - t0
    assert docker("exec", trainer(), "id", "-u") == "10001"
    services = docker("ps", "--format", "{{.Label \"com.docker.compose.service\"}}",
                      "--filter", "label=com.docker.compose.project=alexnet").split()
    assert sorted(services) == ["grafana", "prometheus", "trainer"]  # GPUS=none: no dcgm-exporter


def test_grafana_gets_the_password_as_typed(stack: Path) -> None:
    grafana = docker("ps", "-q", "--filter", "label=com.docker.compose.service=grafana")
    env = json.loads(docker("inspect", "-f", "{{json .Config.Env}}", grafana))
    assert f"GF_SECURITY_ADMIN_PASSWORD={PASSWORD}" in env, [e for e in env if "PASSWORD" in e]


def test_prometheus_scrapes_the_trainer_with_its_rank(stack: Path) -> None:
    def rank0():
        with urllib.request.urlopen(f"{PROMETHEUS}/api/v1/targets", timeout=10) as r:
            targets = json.load(r)["data"]["activeTargets"]
        return [t for t in targets if t["scrapeUrl"] == "http://127.0.0.1:9431/metrics" and t["health"] == "up"]
    (target,) = wait_for("Prometheus scraping 127.0.0.1:9431 (up)", rank0, 120)
    assert target["labels"]["rank"] == "0" and target["labels"]["job"] == "alexnet"


def test_prometheus_is_the_series_compose_pins(stack: Path) -> None:
    """The real image or the stand-in (Debian sid's build of that series, as the host tests run):
    the dashboard's queries below are answered by the PromQL the user's stack has."""
    with urllib.request.urlopen(f"{PROMETHEUS}/api/v1/status/buildinfo", timeout=10) as r:
        version = json.load(r)["data"]["version"]
    assert version.startswith(pinned_series() + "."), f"the stack runs Prometheus {version}, compose pins {pinned_series()}"


def test_prometheus_evaluates_the_alerting_rules(stack: Path) -> None:
    """docker/prometheus/alerts.yml mounted next to prometheus.yml, loaded and evaluated without error."""
    def evaluated():
        with urllib.request.urlopen(f"{PROMETHEUS}/api/v1/rules", timeout=10) as r:
            loaded = [rule for g in json.load(r)["data"]["groups"] for rule in g["rules"]]
        return loaded if loaded and all(rule["health"] != "unknown" for rule in loaded) else None
    loaded = wait_for("the alerting rules evaluated", evaluated, 60)
    assert sorted(r["name"] for r in loaded) == sorted(r["alert"] for r in alert_rules()), loaded
    assert all(r["health"] == "ok" for r in loaded), loaded


def test_build_info_carries_the_real_revision(stack: Path) -> None:
    (info,) = wait_for("alexnet_build_info in Prometheus", lambda: query('alexnet_build_info{rank="0"}'), 60)
    revision = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()  # what make train builds with
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert info["metric"]["git_revision"] == revision and revision
    assert info["metric"]["version"] == version and info["metric"]["device"] == "cpu"


def dashboard_queries() -> dict[str, str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {f"{p['title']}: {t['expr']}": t["expr"] for p in panels if p["title"] not in GPU_PANELS for t in p["targets"]}


def test_every_dashboard_query_returns_data(stack: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 15, queries
    t0 = time.monotonic()
    # The last values to exist: an evaluation, a checkpoint, and two scrapes of each rate's window.
    wait_for("an evaluation and a checkpoint", lambda: events(stack, "checkpoint") and events(stack, "eval"), 420)
    deadline = time.monotonic() + 180
    while missing := [k for k, e in queries.items() if not finite(e)]:
        assert time.monotonic() < deadline, f"dashboard queries without data from Prometheus: {missing}"
        time.sleep(5)
    TIMES["dashboard data after healthy"] = time.monotonic() - t0
    grafana = docker("ps", "-q", "--filter", "label=com.docker.compose.service=grafana")
    for path in ("/etc/grafana/provisioning/datasources/prometheus.yaml", f"/etc/grafana/dashboards/{DASHBOARD.name}"):
        docker("exec", grafana, "test", "-s", path)  # what Grafana would provision is mounted where it looks


def test_make_logs_shows_the_trainer(stack: Path) -> None:
    proc = subprocess.Popen(["make", "--no-print-directory", "logs"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"step \d+", line) and any("metrics: http://127.0.0.1:9431" in x for x in lines):
                break
            assert time.monotonic() < deadline, "".join(lines[-30:])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert any("new run" in x or "resuming run" in x for x in lines), "".join(lines[-30:])


def test_make_stop_checkpoints_and_make_train_resumes(stack: Path, work: Path) -> None:
    t0 = time.monotonic()
    make("stop")  # the Makefile's defaults for SHARDS, RUN and CONFIG
    assert time.monotonic() - t0 < GRACE  # ended by the trainer, not by compose's SIGKILL
    s = state(trainer())
    assert s["Status"] == "exited" and s["ExitCode"] == 0
    (stopped,) = events(stack, "stopped")
    step, name = stopped["step"], Path(events(stack, "checkpoint")[-1]["path"]).name  # the checkpoint of the stop
    assert (stack / name).exists() and int(re.findall(r"\d+", name)[-1]) == step
    make("train", "GPUS=none", f"SHARDS={work / SHARDS}", f"RUN={stack}", f"CONFIG={work / 'tiny.toml'}")
    starts = wait_for("a second start in log.jsonl", lambda: len(events(stack, "start")) == 2 and events(stack, "start"),
                      300)
    assert starts[1]["step"] == step and Path(starts[1]["resumed_from"]).name == name
    wait_for("training past the resumed step",
             lambda: any(e.get("step", 0) > step for e in events(stack, "train")), 300)
    _killed_trainer_restarts(stack)
    # A closed terminal's SIGHUP is a stop too: the entrypoint trapped only TERM and INT, so tini's
    # SIGHUP killed it and the trainer, no checkpoint (Exited 129).
    docker("kill", "-s", "HUP", trainer())
    wait_for("the trainer to exit after SIGHUP", lambda: state(trainer())["Status"] == "exited", 60, every=1)
    assert state(trainer())["ExitCode"] == 0
    _, hup = events(stack, "stopped")
    name = Path(events(stack, "checkpoint")[-1]["path"]).name
    assert hup["reason"] == "SIGHUP" and (stack / name).exists() and int(re.findall(r"\d+", name)[-1]) == hup["step"]
    make("stop")
    assert make("stop").stdout.strip() == "make stop: the stack is not running; nothing to stop"  # it said nothing


def _killed_trainer_restarts(run: Path) -> None:
    """The trainer's process killed as the OOM killer does (kill -9 from the host): the entrypoint
    restarts it, and the new start, told by the mark the killed one left (service.unclean_end),
    checks the shards before training, then trains on from the newest checkpoint."""
    pids = [int(line.split()[0]) for line in docker("top", trainer(), "-eo", "pid,args").splitlines()[1:]
            if "-m service" in line]
    assert len(pids) == 1, pids
    starts = len(events(run, "start"))
    os.kill(pids[0], signal.SIGKILL)
    wait_for("a start after the kill", lambda: len(events(run, "start")) > starts, 120)
    assert len(events(run, "unclean_end")) == 1 and state(trainer())["Status"] == "running"
    logs = subprocess.run(["docker", "logs", trainer()], capture_output=True, text=True, timeout=60).stderr
    assert "the trainer crashed (exit 137); restarting" in logs and "did not end in Python" in logs, logs[-3000:]
    resumed = events(run, "start")[-1]["step"]
    wait_for("training after the restart", lambda: any(e.get("step", 0) > resumed for e in events(run, "train")), 300)


def test_make_stop_with_two_ranks_checkpoints_and_exits_0(work: Path) -> None:
    """NPROC=2: torchrun, as every multi-GPU make train runs.  The entrypoint passed make stop's
    SIGTERM to torchrun, which raised SignalException (a traceback in make logs) and exited 1, the
    container's exit code for a data error, though both ranks had checkpointed."""
    run = work / "run-2-ranks"
    make("train", "GPUS=none", "NPROC=2", f"SHARDS={work / SHARDS}", f"RUN={run}", f"CONFIG={work / 'tiny.toml'}")
    wait_for("a training step", lambda: events(run, "train"), 300)
    t0 = time.monotonic()
    make("stop")
    assert time.monotonic() - t0 < GRACE  # ended by the trainer, not by compose's SIGKILL
    s = state(trainer())
    assert s["Status"] == "exited" and s["ExitCode"] == 0
    logs = subprocess.run(["docker", "logs", trainer()], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in logs.stdout + logs.stderr and "SignalException" not in logs.stdout + logs.stderr, \
        (logs.stdout + logs.stderr)[-3000:]
    (stopped,) = events(run, "stopped")
    name = Path(events(run, "checkpoint")[-1]["path"]).name
    assert stopped["world_size"] == 2 and stopped["reason"] == "SIGTERM"
    assert (run / name).exists() and int(re.findall(r"\d+", name)[-1]) == stopped["step"]
    rank1 = [json.loads(x) for x in (run / "log.rank1.jsonl").read_text().splitlines()]
    assert [e["step"] for e in rank1 if e.get("event") == "stopped"] == [stopped["step"]]  # both ranks stopped there


@pytest.mark.parametrize("nproc, ranks", [("auto", 1), ("2", 2)])  # auto: one process on the CPU
def test_a_run_directory_the_trainer_cannot_write_stops_it_in_one_line(nproc: str, ranks: int, work: Path) -> None:
    """NPROC=2: a line from each rank, where torchrun's ChildFailedError report used to follow them."""
    run = work / f"foreign-run-{nproc}"
    run.mkdir()
    os.chown(run, 12345, 12345)  # the trainer runs as the run directory's owner...
    run.chmod(0o555)  # ...who cannot write it
    make("train", "GPUS=none", f"NPROC={nproc}", f"SHARDS={work / SHARDS}", f"RUN={run}", f"CONFIG={work / 'tiny.toml'}")
    wait_for("the trainer to exit", lambda: state(trainer())["Status"] == "exited", 120)
    time.sleep(15)  # a restart policy would have restarted it by now
    s = state(trainer())
    assert s["Status"] == "exited" and s["ExitCode"] == 5 and not s["Restarting"]
    assert json.loads(docker("inspect", "-f", "{{json .RestartCount}}", trainer())) == 0
    logs = subprocess.run(["docker", "logs", trainer()], capture_output=True, text=True, timeout=60)
    lines = (logs.stdout + logs.stderr).strip().splitlines()
    assert 1 <= len(lines) <= ranks and all(line.startswith("service: ") for line in lines), lines
    assert any(line.startswith("service: run directory /runs/run cannot be written (Permission denied) by uid 12345")
               for line in lines), lines
