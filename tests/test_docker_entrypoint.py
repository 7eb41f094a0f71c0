"""docker/entrypoint.sh and docker/healthcheck.py, run for real with python and torchrun replaced
by small scripts: the launcher it picks, crash restarts, no restart after a diagnosed exit,
SIGTERM passed on, and the health check probing the port the service really uses."""
from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
ECHO = 'echo {name} "$@"\n'


def entrypoint(tmp_path: Path, body: str = ECHO, args: tuple[str, ...] = ("--config", "c.toml"), popen: bool = False,
               **env: str):
    """docker/entrypoint.sh with python and torchrun replaced by scripts running ``body``
    (``{name}`` is the replaced command's name; ``$RUNS`` counts the launches)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python", "torchrun"):
        (bin_dir / name).write_text('#!/bin/sh\necho x >> "$RUNS"\n' + body.replace("{name}", name))
        (bin_dir / name).chmod(0o755)
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HTTP_HOST": "127.0.0.1", "HTTP_PORT": "9431",
            "PROBE_FILE": str(tmp_path / "probe"), "ALEXNET_EXIT_FILE": str(tmp_path / "exit"),
            "RUNS": str(tmp_path / "runs"), "RESTART_DELAY": "0", "NPROC": "1"}
    cmd = [str(DOCKER / "entrypoint.sh"), *args]
    if popen:
        return subprocess.Popen(cmd, env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True, timeout=60)


def launches(tmp_path: Path) -> int:
    runs = tmp_path / "runs"
    return len(runs.read_text().splitlines()) if runs.exists() else 0


def test_entrypoint_chooses_the_launcher(tmp_path: Path) -> None:
    flags = "--http.host 127.0.0.1 --http.port 9431 --config c.toml"
    assert entrypoint(tmp_path, NPROC="1").stdout.strip() == f"python -m service {flags}"
    assert entrypoint(tmp_path, NPROC="4").stdout.strip() == \
        f"torchrun --standalone --nproc-per-node 4 -m service {flags}"
    assert (tmp_path / "probe").read_text().split() == ["4", "127.0.0.1", "9431"]  # what healthcheck.py probes
    node0 = entrypoint(tmp_path, NPROC="8", NNODES="2", NODE_RANK="0", RDZV_ENDPOINT="host0:29400").stdout
    assert node0.strip() == ("torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint host0:29400 "
                             f"--rdzv-id alexnet --rdzv-conf is_host=true -m service {flags}")
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


@pytest.mark.parametrize("nproc, launcher_code", [("1", 5), ("2", 1)])  # torchrun exits 1 whatever its ranks did
def test_a_diagnosed_exit_is_not_restarted(nproc: str, launcher_code: int, tmp_path: Path) -> None:
    # What service.errors.record_exit does for a run directory the user cannot write (exit 5).
    body = f'echo "service: run directory /runs/run cannot be written" >&2\necho 5 > "$ALEXNET_EXIT_FILE"\nexit {launcher_code}\n'
    result = entrypoint(tmp_path, body, NPROC=nproc)
    assert result.returncode == 5 and launches(tmp_path) == 1
    assert result.stderr.splitlines() == ["service: run directory /runs/run cannot be written"]  # nothing added


def test_sigterm_reaches_the_service_and_its_exit_code_is_kept(tmp_path: Path) -> None:
    body = ('trap \'echo TERM >> "$RUNS.signals"; exit 0\' TERM\ntouch "$RUNS.ready"\n'
            'while :; do sleep 0.1; done\n')
    proc = entrypoint(tmp_path, body, popen=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "runs.ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # docker stop, through tini
        code = proc.wait(timeout=20)
    finally:
        proc.kill()
    assert code == 0 and (tmp_path / "runs.signals").read_text() == "TERM\n" and launches(tmp_path) == 1


class Healthz(http.server.BaseHTTPRequestHandler):
    codes: dict[int, int] = {}

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(self.codes.get(self.server.server_address[1], 404) if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def servers():
    """Two /healthz servers on neighbouring ports (rank r is on base + r); ``Healthz.codes`` sets their answers."""
    made = [http.server.HTTPServer(("127.0.0.1", 0), Healthz)]
    try:
        made.append(http.server.HTTPServer(("127.0.0.1", made[0].server_address[1] + 1), Healthz))
    except OSError:
        made[0].server_close()
        pytest.skip("no two free neighbouring ports")
    for s in made:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield [s.server_address[1] for s in made]
    Healthz.codes.clear()
    for s in made:
        s.shutdown()
        s.server_close()


def healthcheck(probe: Path, **env: str) -> int:
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], capture_output=True, timeout=30,
                          env={**os.environ, "PROBE_FILE": str(probe), **env}).returncode


def test_healthcheck_needs_every_rank_healthy(servers: list[int], tmp_path: Path) -> None:
    (tmp_path / "probe").write_text(f"2 0.0.0.0 {servers[0]}\n")
    Healthz.codes.update({servers[0]: 200, servers[1]: 200})
    assert healthcheck(tmp_path / "probe") == 0
    Healthz.codes[servers[1]] = 503  # rank 1 stalled
    assert healthcheck(tmp_path / "probe") == 1


def test_healthcheck_probes_the_port_given_on_the_command_line(servers: list[int], tmp_path: Path) -> None:
    # HTTP_PORT says servers[1], which answers 503; the service was started with --http.port servers[0].
    Healthz.codes.update({servers[0]: 200, servers[1]: 503})
    for flags in (("--http.port", str(servers[0])), (f"--http.port={servers[0]}",)):
        assert entrypoint(tmp_path, args=("--config", "c.toml", *flags), HTTP_PORT=str(servers[1])).returncode == 0
        assert healthcheck(tmp_path / "probe", HTTP_PORT=str(servers[1])) == 0
