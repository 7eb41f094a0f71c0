"""`make train`, `stop`, `logs`, `shards-docker` (scripts/stack.sh) without a Docker engine: what
they say where Docker cannot run, and what they hand to docker, recorded by a stand-in `docker`
and checked with Debian's docker-compose.  make test-docker runs them against a real engine."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.test_docker import compose_config, tool

ROOT = Path(__file__).resolve().parents[1]
# A docker with an engine and compose v2.26 that records what it is asked (args, and the paths
# compose would interpolate); `docker info` shows no NVIDIA runtime.
RECORDER = """case "$1" in
  info) echo '{}'; exit 0 ;;
  compose) [ "$2" = version ] && { echo 2.26.1; exit 0; } ;;
esac
case " $* " in *" ps -a -q trainer "*) [ -n "${NO_TRAINER:-}" ] || echo 4f2a9c1e ;; esac
case " $* " in *" ps -q "*) [ -n "${NOTHING_RUNS:-}" ] || echo 4f2a9c1e ;; esac
printf '%s\\n' "$*" "SHARDS=$SHARDS" "RUN=$RUN" "CONFIG=$CONFIG" "GRAFANA_PASSWORD=$GRAFANA_PASSWORD" >> "$DOCKER_LOG"
"""


def fake_path(tmp_path: Path, docker: str | None) -> str:
    """A PATH with the tools make and stack.sh use, and ``docker`` as the given script (or none)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("bash", "make", "dirname", "timeout", "grep", "sort", "head", "sed", "cat", "realpath", "mktemp",
                 "rm", "mkdir", "stat", "ls", "chown", "git", "printf", "hostname"):
        (bin_dir / name).symlink_to(tool(name))
    if docker is not None:
        (bin_dir / "docker").write_text("#!/bin/sh\n" + docker)
        (bin_dir / "docker").chmod(0o755)
    return str(bin_dir)


def make(path: str, tmp_path: Path, *args: str, **environ: str) -> subprocess.CompletedProcess:
    env = {"PATH": path, "HOME": str(tmp_path), "GRAFANA_PASSWORD": "x", "DOCKER_LOG": str(tmp_path / "docker.log"),
           **environ}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def make_train(path: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return make(path, tmp_path, "train", f"SHARDS={tmp_path}", f"RUN={tmp_path}/run")


def assert_one_line_naming_train_local(result: subprocess.CompletedProcess, reason: str) -> None:
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0
    assert len(output.splitlines()) == 1 and "make train-local" in output and reason in output, output
    assert not (Path(result.args[-1].split("=", 1)[1])).exists()  # nothing was started or created


@pytest.mark.parametrize("docker, reason", [
    (None, "no docker command"),
    ('[ "$1" = info ] && exit 1\nexit 0\n', "no Docker engine"),
    ('case "$1 $2" in "compose version") echo 2.29.1;; "info "*) echo "{}";; esac\n', "no NVIDIA runtime"),
])
def test_make_train_says_why_docker_cannot_run(docker: str | None, reason: str, tmp_path: Path) -> None:
    assert_one_line_naming_train_local(make_train(fake_path(tmp_path, docker), tmp_path), reason)


def test_make_train_on_this_machine(tmp_path: Path) -> None:
    check = subprocess.run(["bash", str(ROOT / "scripts" / "stack.sh"), "check", "train"], capture_output=True,
                           text=True, timeout=120)
    if check.returncode == 0:
        pytest.skip("this machine can run the Docker stack: make train would start it")
    assert_one_line_naming_train_local(make_train(os.environ["PATH"], tmp_path), "make train:")


def _shards(tmp_path: Path) -> Path:
    """A directory that passes make train's own look for shards (the trainer checks them)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    return shards


def recorded(tmp_path: Path) -> list[dict[str, str]]:
    """Each docker call the recorder saw: its arguments and the paths in its environment."""
    lines = (tmp_path / "docker.log").read_text().splitlines()
    calls = [lines[i:i + 5] for i in range(0, len(lines), 5)]
    return [{"args": c[0], **dict(kv.split("=", 1) for kv in c[1:])} for c in calls]


@pytest.mark.parametrize("target", ["stop", "logs"])
def test_stop_and_logs_work_with_the_makefiles_defaults(target: str, tmp_path: Path) -> None:
    # The Makefile always passes SHARDS=data/shards RUN=runs/alexnet CONFIG=configs/paper.toml;
    # compose reads a relative path without ./ as a named volume and refuses the whole file.
    result = make(fake_path(tmp_path, RECORDER), tmp_path, target)
    assert result.returncode == 0, result.stderr
    calls = recorded(tmp_path)
    assert calls and all(c["args"].startswith("compose -p alexnet -f docker/compose.yaml") for c in calls)
    for call in calls:
        paths = {k: call[k] for k in ("SHARDS", "RUN", "CONFIG")}
        assert all(Path(p).is_absolute() for p in paths.values()), paths
        check = compose_config(tmp_path, ROOT / "docker" / "compose.yaml", **paths)
        assert check.returncode == 0, check.stderr


def test_make_logs_without_a_trainer_container_says_so(tmp_path: Path) -> None:
    """It printed nothing and exited 0 (compose follows no container without a word)."""
    result = make(fake_path(tmp_path, RECORDER), tmp_path, "logs", NO_TRAINER="1")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[0] == "make logs: the stack has no trainer container: make train starts it"
    assert not any(" logs " in c["args"] for c in recorded(tmp_path)), recorded(tmp_path)


def test_make_stop_with_nothing_running_says_so(tmp_path: Path) -> None:
    """It printed nothing and exited 0: stopped, or never started, the user could not tell."""
    result = make(fake_path(tmp_path, RECORDER), tmp_path, "stop", NOTHING_RUNS="1")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.strip() == "make stop: the stack is not running; nothing to stop"
    assert not any(" stop" in c["args"] for c in recorded(tmp_path)), recorded(tmp_path)


def test_make_train_gpus_none_needs_no_nvidia_runtime_and_starts_no_dcgm(tmp_path: Path) -> None:
    shards, run = tmp_path / "shards", tmp_path / "run"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    result = make(fake_path(tmp_path, RECORDER), tmp_path, "train", "GPUS=none", f"SHARDS={shards}", f"RUN={run}",
                  "CONFIG=configs/demo.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    (call,) = recorded(tmp_path)
    assert call["args"].endswith("up -d --build trainer prometheus grafana")  # everything but dcgm-exporter
    assert call["CONFIG"] == str(ROOT / "configs" / "demo.toml") and call["RUN"] == str(run)
    assert "GPUS=none" in result.stdout


def test_make_train_without_a_grafana_password_says_so_in_one_line(tmp_path: Path) -> None:
    """As every other reason ``make train`` cannot start: one line, and nothing handed to docker
    (before: the shell's ``${GRAFANA_PASSWORD:?}`` text, then make's own error line)."""
    shards = _shards(tmp_path)
    result = make(fake_path(tmp_path, RECORDER), tmp_path, "train", "GPUS=none", f"SHARDS={shards}", f"RUN={tmp_path}/run",
                  GRAFANA_PASSWORD="")
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0 and len(output.splitlines()) == 1 and "set GRAFANA_PASSWORD" in output, output
    assert not (tmp_path / "docker.log").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("gpus", ["0", "two", "0,,1"])
def test_make_train_refuses_bad_gpus_in_one_line_before_touching_run(gpus: str, tmp_path: Path) -> None:
    """On a machine with the NVIDIA runtime, GPUS=0 created RUN (and handed a fresh one to the
    image's user) before stack.sh refused it, in its line and make's "*** Error 1" after it."""
    shards = _shards(tmp_path)
    nvidia = RECORDER.replace("info) echo '{}'", """info) echo '{"Runtimes": {"nvidia": {}}}'""")
    result = make(fake_path(tmp_path, nvidia), tmp_path, "train", f"GPUS={gpus}", f"SHARDS={shards}",
                  f"RUN={tmp_path}/run")
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0 and len(output.splitlines()) == 1, output
    assert f"make train: GPUS={gpus} " in output and "0,1" in output, output
    assert not (tmp_path / "docker.log").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("bind, where", [("10.0.0.5", "command line"), ("::", "environment")])
def test_make_train_refuses_a_bind_address_the_stack_cannot_watch(bind: str, where: str, tmp_path: Path) -> None:
    """BIND=<one address> moved every listener there, but Prometheus scrapes the trainer at
    127.0.0.1 (prometheus.yml) and Grafana queries Prometheus there: the stack trained with every
    target down and an empty dashboard, and nothing said so."""
    shards = _shards(tmp_path)
    args = ["train", "GPUS=none", f"SHARDS={shards}", f"RUN={tmp_path}/run"]
    if where == "command line":
        result = make(fake_path(tmp_path, RECORDER), tmp_path, *args, f"BIND={bind}")
    else:
        result = make(fake_path(tmp_path, RECORDER), tmp_path, *args, BIND=bind)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0 and len(output.splitlines()) == 1, output
    assert f"make train: BIND={bind} would hide the trainer from Prometheus" in output and "0.0.0.0" in output, output
    assert not (tmp_path / "docker.log").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("password, where", [("pa$sw$(x)rd #1 'q\"", "command line"), ("$x", "environment")])
def test_make_train_hands_the_grafana_password_over_as_typed(password: str, where: str, tmp_path: Path) -> None:
    """make expanded a '$' in a variable given on its command line: pa$sw$(x)rd reached Grafana as
    "pawrd" (the login failed, and nothing said why).  Exported in the shell, it already went as typed."""
    shards = _shards(tmp_path)
    args = ["train", "GPUS=none", f"SHARDS={shards}", f"RUN={tmp_path}/run"]
    if where == "command line":
        result = make(fake_path(tmp_path, RECORDER), tmp_path, *args, f"GRAFANA_PASSWORD={password}")
    else:
        result = make(fake_path(tmp_path, RECORDER), tmp_path, *args, GRAFANA_PASSWORD=password)
    assert result.returncode == 0, result.stdout + result.stderr
    (call,) = recorded(tmp_path)
    assert call["GRAFANA_PASSWORD"] == password


def test_shards_docker_needs_no_compose(tmp_path: Path) -> None:
    no_compose = 'case "$1" in info) exit 0 ;; compose) echo "unknown command: docker compose" >&2; exit 1 ;; esac\n'
    path = fake_path(tmp_path, no_compose)

    def check(target: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "scripts" / "stack.sh"), "check", target], env={"PATH": path},
                              capture_output=True, text=True, timeout=60)
    assert check("shards-docker").returncode == 0 and check("shards-docker").stdout == ""  # docker build + run
    assert check("train").returncode == 1 and "compose plugin" in check("train").stdout


@pytest.mark.parametrize("case", ["shards a file", "shards without a manifest", "run a file", "no config"])
def test_make_train_names_a_path_it_cannot_use_in_one_line(case: str, tmp_path: Path) -> None:
    """Each was said by stack.sh after make had started the recipe, so make added its own
    ``*** [...] Error 1``; SHARDS as a file said "has no manifest.json; make shards first", and RUN as a
    file was mkdir's "File exists".  Now one line each, before docker is asked anything."""
    shards, run, config = _shards(tmp_path), tmp_path / "run", tmp_path / "train.toml"
    config.write_text("")
    expected = {"shards a file": "is a file, not a directory of shards", "run a file": "is a file, not a run directory",
                "shards without a manifest": "has no manifest.json; make shards (or make shards-docker) first",
                "no config": "no config file"}[case]
    if case == "shards a file":
        shards = tmp_path / "shards.tar"
        shards.write_text("")
    elif case == "shards without a manifest":
        (shards / "manifest.json").unlink()
    elif case == "run a file":
        run.write_text("")
    else:
        config = tmp_path / "missing.toml"
    result = make(fake_path(tmp_path, RECORDER), tmp_path, "train", "GPUS=none", f"SHARDS={shards}", f"RUN={run}",
                  f"CONFIG={config}")
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0 and len(output.splitlines()) == 1, output
    assert "make train: " in output and expected in output, output
    assert not (tmp_path / "docker.log").exists()
