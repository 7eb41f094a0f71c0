"""The HTTP endpoint of one service process, in a daemon thread: ``/metrics``, ``/healthz``, ``/status``.

``/metrics``: the Prometheus text format of the service's private registry.
``/healthz``: 200 while the training loop's heartbeat is fresh, 503 with the reason once it is
older than ``http.stall_seconds`` (a hung data loader, a stuck collective, a dead GPU).
``/status``: JSON for people and scripts (run id, epoch, step, images/s, loss, lr, last
checkpoint, last evaluation, global batch).

The socket is bound in the constructor, before any slow start-up work, so a port that is
already taken is reported at once as a ``ServiceError`` (exit code 3), not as a traceback.
"""
from __future__ import annotations

import errno
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from service.errors import EXIT_PORT, ServiceError
from service.status import StatusBoard


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow scraper never keeps the process alive
    registry: CollectorRegistry
    board: StatusBoard


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            healthy, reason = self.server.board.health()
            self._send(200 if healthy else 503, (reason + "\n").encode(), "text/plain; charset=utf-8")
        elif path == "/status":
            body = json.dumps(self.server.board.snapshot(), indent=1, default=str) + "\n"
            self._send(200, body.encode(), "application/json")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /status\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every few seconds would drown the training log: no access log."""


class HttpEndpoint:
    """Serve ``registry`` and ``board`` on ``host:port`` (port 0: any free port) in a thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, board: StatusBoard) -> None:
        try:
            self._server = _Server((host, port), _Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServiceError(EXIT_PORT, f"port {port} on {host} is already in use (another run or exporter?): "
                                   "stop it or choose another port with --http.port N (make: PORT=N)") from None
            raise ServiceError(EXIT_PORT, f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from None
        self._server.registry, self._server.board = registry, board
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    def start(self) -> HttpEndpoint:
        self._thread.start()
        return self

    def url(self, path: str) -> str:
        """The URL to print: ``localhost`` for the wildcard address."""
        host = "localhost" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
