"""docker/healthcheck.py, run for real against two /healthz servers: every rank must be healthy,
and the port probed is the one the service was started with (the entrypoint's probe file)."""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.test_docker_entrypoint import DOCKER, entrypoint


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
