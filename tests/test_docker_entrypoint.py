"""docker/entrypoint.sh, run for real with python (and so ``python -m service.launch``, torchrun)
replaced by small scripts: the launcher it picks, crash restarts, no restart after a diagnosed exit, stop signals passed on.
(The stop with several ranks: ``tests/test_docker_entrypoint_ranks.py``; the health check:
``tests/test_docker_healthcheck.py``; the real torchrun and service: ``tests/test_docker_entrypoint_torchrun.py``.)"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
ECHO = 'echo {name} "$@"\n'


def entrypoint(tmp_path: Path, body: str = ECHO, args: tuple[str, ...] = ("--config", "c.toml"), popen: bool = False,
               torchrun: str | None = None, **env: str):
    """docker/entrypoint.sh with python replaced by a script running ``body`` (``{name}`` is
    python; ``$RUNS`` counts the launches); ``torchrun``: a whole python script that
    ``python -m service.launch`` runs instead, by this python, so that it has the name
    (/proc/PID/comm) of the ranks it starts with ``sys.executable``, as in the image."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    launcher = ""
    if torchrun:
        (bin_dir / "launch.py").write_text(torchrun)
        script = shlex.quote(str(bin_dir / "launch.py"))
        launcher = f'[ "$1 $2" = "-m service.launch" ] && shift 2 && exec {shlex.quote(sys.executable)} {script} "$@"\n'
    (bin_dir / "python").write_text('#!/bin/sh\n' + launcher + 'echo x >> "$RUNS"\n' + body.replace("{name}", "python"))
    (bin_dir / "python").chmod(0o755)
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HTTP_HOST": "127.0.0.1", "HTTP_PORT": "9431",
            "PROBE_FILE": str(tmp_path / "probe"), "ALEXNET_EXIT_FILE": str(tmp_path / "exit"),
            "RUNS": str(tmp_path / "runs"), "RESTART_DELAY": "0", "NPROC": "1"}
    cmd = [str(DOCKER / "entrypoint.sh"), *args]
    if popen:
        return subprocess.Popen(cmd, env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_as_in_a_container)
    return subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True, timeout=60,
                          preexec_fn=_as_in_a_container)


def _as_in_a_container() -> None:
    """The stop signals as the entrypoint has them in a container (PID 1 tini's child): none
    ignored.  A test run in the background (``make test &``) starts with SIGINT ignored, one under
    ``nohup`` with SIGHUP ignored, and a shell cannot trap a signal ignored on entry."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def launches(tmp_path: Path) -> int:
    runs = tmp_path / "runs"
    return len(runs.read_text().splitlines()) if runs.exists() else 0


def test_entrypoint_chooses_the_launcher(tmp_path: Path) -> None:
    flags = "--http.host 127.0.0.1 --http.port 9431 --config c.toml"
    assert entrypoint(tmp_path, NPROC="1").stdout.strip() == f"python -m service {flags}"
    assert entrypoint(tmp_path, NPROC="4").stdout.strip() == \
        f"python -m service.launch --standalone --nproc-per-node 4 -m service {flags}"
    assert (tmp_path / "probe").read_text().split() == ["4", "127.0.0.1", "9431"]  # what healthcheck.py probes
    node0 = entrypoint(tmp_path, NPROC="8", NNODES="2", NODE_RANK="0", RDZV_ENDPOINT="host0:29400").stdout
    assert node0.strip() == ("python -m service.launch --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d "
                             f"--rdzv-endpoint host0:29400 --rdzv-id alexnet --rdzv-conf is_host=true -m service {flags}")
    node1 = entrypoint(tmp_path, NPROC="8", NNODES="2", NODE_RANK="1", RDZV_ENDPOINT="host0:29400").stdout
    assert "--rdzv-conf is_host=false" in node1
    missing = entrypoint(tmp_path, NPROC="8", NNODES="2")
    assert missing.returncode != 0 and "RDZV_ENDPOINT" in missing.stderr and missing.stdout == ""


def test_a_crash_is_restarted_and_a_clean_exit_is_not(tmp_path: Path) -> None:
    # The first launch crashes (a segfault's code, nothing recorded), the second finishes.
    body = '[ "$(wc -l < "$RUNS")" = 1 ] && exit 139\nexit 0\n'
    result = entrypoint(tmp_path, body)
    assert result.returncode == 0 and launches(tmp_path) == 2
    assert "crashed (exit 139)" in result.stderr and len(result.stderr.splitlines()) == 1


def test_a_restart_tells_the_service_how_the_crash_before_it_ended(tmp_path: Path) -> None:
    """The restarted service exports the crash's code (alexnet_previous_exit_code): it cannot learn
    it itself, and before, an OOM kill (137) and a segfault (139) looked alike after the restart."""
    body = ('echo "${ALEXNET_PREVIOUS_EXIT-unset}"\n'
            'case $(wc -l < "$RUNS") in *1) exit 137 ;; *2) exit 139 ;; esac\nexit 0\n')
    result = entrypoint(tmp_path, body, ALEXNET_PREVIOUS_EXIT="5")  # inherited: not this container's crash
    assert result.returncode == 0 and launches(tmp_path) == 3, result.stderr
    assert result.stdout.split() == ["unset", "137", "139"]


def test_a_restart_resumes_without_the_first_starts_fresh(tmp_path: Path) -> None:
    """``--fresh true`` wipes the run once, at the first start; a crash restart resumes (before:
    the same command line wiped the run at every restart)."""
    body = '[ "$(wc -l < "$RUNS")" -lt 3 ] && { echo {name} "$@"; exit 139; }\necho {name} "$@"\nexit 0\n'
    result = entrypoint(tmp_path, body, args=("--fresh", "true", "--epochs", "2", "--fresh=true"))
    assert result.returncode == 0 and launches(tmp_path) == 3, result.stderr
    first, *restarts = result.stdout.splitlines()
    assert first.endswith("--fresh true --epochs 2 --fresh=true")
    assert restarts == ["python -m service --http.host 127.0.0.1 --http.port 9431 --epochs 2"] * 2


def test_crashes_in_a_row_give_up(tmp_path: Path) -> None:
    result = entrypoint(tmp_path, "exit 1\n", RESTARTS="2")  # a traceback's exit code, nothing recorded
    assert result.returncode == 1 and launches(tmp_path) == 3
    assert "not restarting again" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("nproc, launcher_code", [("1", 5), ("2", 1)])  # the launcher's: maybe a peer's 1 (PeerGone)
def test_a_diagnosed_exit_is_not_restarted(nproc: str, launcher_code: int, tmp_path: Path) -> None:
    # What service.errors.record_exit does for a run directory the user cannot write (exit 5).
    body = f'echo "service: run directory /runs/run cannot be written" >&2\necho 5 > "$ALEXNET_EXIT_FILE"\nexit {launcher_code}\n'
    result = entrypoint(tmp_path, body, NPROC=nproc)
    assert result.returncode == 5 and launches(tmp_path) == 1
    assert result.stderr.splitlines() == ["service: run directory /runs/run cannot be written"]  # nothing added


@pytest.mark.parametrize("env", [{"NPROC": "abc"}, {"NPROC": "0"}, {"NPROC": "-1"}, {"NNODES": "two"},
                                 {"NNODES": "0:2"}, {"RESTARTS": "many"}, {"RESTART_DELAY": "10s"},
                                 {"STABLE_SECONDS": "1e3"}])
def test_a_setting_that_is_not_a_number_stops_with_exit_2_and_one_line(env: dict[str, str], tmp_path: Path) -> None:
    """NPROC=abc went to torchrun, whose ValueError traceback (exit 1, a data error's code) the loop
    took for a crash: six tracebacks and a minute of restarts.  A RESTARTS that is not a number
    failed the shell's test, so the crashes were restarted forever."""
    (name, value), = env.items()
    result = entrypoint(tmp_path, **{"NNODES": "2", "RDZV_ENDPOINT": "host0:29400", **env})
    assert result.returncode == 2 and launches(tmp_path) == 0, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"entrypoint: {name}={value} ") and not (tmp_path / "probe").exists(), line


def test_nproc_and_nnodes_take_what_torchrun_does(tmp_path: Path) -> None:
    elastic = entrypoint(tmp_path, NPROC="2", NNODES="1:4", RDZV_ENDPOINT="host0:29400", RESTARTS="0",
                         RESTART_DELAY="0", STABLE_SECONDS="600")
    assert elastic.returncode == 0 and "--nnodes 1:4 --nproc-per-node 2 " in elastic.stdout, elastic.stderr


def wait_ready(tmp_path: Path, *names: str) -> None:
    deadline = time.monotonic() + 30
    while not all((tmp_path / n).exists() and (tmp_path / n).read_text() for n in names) \
            and time.monotonic() < deadline:
        time.sleep(0.05)


def kill_left(tmp_path: Path, *names: str) -> None:
    """The stand-ins that a signal did not reach (each wrote its pid to its ready file) would run on."""
    for name in names:
        try:
            os.kill(int((tmp_path / name).read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_reaches_the_service_and_its_exit_code_is_kept(sig: signal.Signals, tmp_path: Path) -> None:
    """docker stop (SIGTERM) or a SIGHUP to the container, through tini; an untrapped SIGHUP
    killed the entrypoint (exit 129) and the service with it, without a checkpoint."""
    body = ('trap \'echo TERM >> "$RUNS.signals"; exit 0\' TERM\n'
            'trap \'echo HUP >> "$RUNS.signals"; exit 0\' HUP\necho $$ > "$RUNS.ready"\n'
            'while :; do sleep 0.1; done\n')
    proc = entrypoint(tmp_path, body, popen=True)
    try:
        wait_ready(tmp_path, "runs.ready")
        proc.send_signal(sig)
        code = proc.wait(timeout=20)
    finally:
        proc.kill()
        kill_left(tmp_path, "runs.ready")
    assert code == 0 and (tmp_path / "runs.signals").read_text() == sig.name[3:] + "\n" and launches(tmp_path) == 1


NOTHING_TO_SAVE = "entrypoint: stopped with no trainer running (not started yet, or its ranks had ended); nothing to save"


def stop_python(tmp_path: Path, body: str, ready: str, **env: str) -> tuple[int, str]:
    """The entrypoint with python running ``body``, SIGTERM once ``ready`` is written; (exit code, stderr)."""
    proc = entrypoint(tmp_path, body, popen=True, **env)
    try:
        wait_ready(tmp_path, ready)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    finally:
        proc.kill()
        kill_left(tmp_path, "runs.ready")
    return code, proc.communicate()[1]


def test_a_stop_before_the_service_handles_it_exits_0_with_one_line(tmp_path: Path) -> None:
    """docker stop in python's first seconds (its imports, before the stop handler): the signal's
    default action ended it, and the container with 143."""
    body = 'echo $$ > "$RUNS.ready"\nsleep 3\ntrap \'exit 0\' TERM\nwhile :; do sleep 0.1; done\n'
    code, err = stop_python(tmp_path, body, "runs.ready")
    assert code == 0 and err.splitlines() == [NOTHING_TO_SAVE] and launches(tmp_path) == 1


def test_a_stop_while_nproc_auto_asks_torch_starts_no_trainer(tmp_path: Path) -> None:
    """NPROC=auto runs `python -c 'import torch ...'` first, seconds; the traps were not in yet and
    the signal ended the entrypoint (143)."""
    body = 'if [ "$1" = -c ]; then echo 1 > "$RUNS.ready"; sleep 2; echo 1; exit 0; fi\necho {name} "$@"\n'
    code, err = stop_python(tmp_path, body, "runs.ready", NPROC="auto")
    assert code == 0 and err.splitlines() == [NOTHING_TO_SAVE] and launches(tmp_path) == 1  # the query only


def test_a_diagnosed_exit_during_a_stop_keeps_its_code(tmp_path: Path) -> None:
    """The stop's checkpoint could not be written (exit 4, recorded): the container said 1."""
    body = ('trap \'echo 4 > "$ALEXNET_EXIT_FILE"; exit 1\' TERM\necho $$ > "$RUNS.ready"\n'
            'while :; do sleep 0.1; done\n')
    code, _ = stop_python(tmp_path, body, "runs.ready")
    assert code == 4 and launches(tmp_path) == 1
