"""The HTTP endpoint of one service process, in a daemon thread: ``/metrics``, ``/healthz``, ``/status``
(GET, and HEAD: the same without the body).

``/metrics``: the Prometheus text format of the service's private registry.
``/healthz``: 200 while the training loop's heartbeat is fresh, 503 with the reason once it is
older than ``http.stall_seconds`` (a hung data loader, a stuck collective, a dead GPU).
``/status``: JSON for people and scripts (run id, epoch, step, images/s, loss, lr, last
checkpoint, last evaluation, global batch).

The socket is bound in the constructor, before any slow start-up work, so a port that is
already taken is reported at once as a ``ServiceError`` (exit code 3), not as a traceback.

Hostile or clumsy clients, against socketserver's defaults: with a listen backlog of 5, 20
scrapers connecting together overflowed it (600 scrapes in rounds of 20: 576 connects dropped
by the kernel, each then waiting for TCP's SYN retransmit, 1 s, 3 s, 7 s...; issue 16 measured
p99 1.1 s, max 7.7 s), so the backlog is ``REQUEST_QUEUE`` (none dropped).  A client sending one
byte a second held a handler thread forever (a socket timeout restarts with every byte), so
the whole request must arrive within ``READ_SECONDS``.  A client that hangs up early made
socketserver print a 20-line ``BrokenPipeError``/``ConnectionResetError`` traceback on the
service's stderr; a disconnect is the client's business, so it is dropped quietly.
A connection that sends nothing held its thread for the whole ``READ_SECONDS``: 3000 such
connections (a port scanner, a stuck client) made 615 threads.  So at most ``MAX_HANDLERS``
connections are handled at once (one more is closed unanswered, and its client tries again), and
the request's first byte must arrive within ``IDLE_SECONDS``, which frees their places sooner.
Each connection gets a daemon thread that only formats what the loop already recorded: the
training loop never waits for a scrape.

A service that fails with a diagnosed exit code (a diverged run: 6, ``service.errors``) sets
``alexnet_exit_code`` and, when something scrapes ``/metrics``, waits for its next scrape
(``HttpEndpoint.last_words``, at most ``LAST_WORDS_SECONDS``): the scraper's last sample of the
target then says why it is down, where Prometheus saw only ``up == 0`` before.
"""
from __future__ import annotations

import errno
import io
import json
import math
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from service.errors import EXIT_PORT, ServiceError
from service.status import StatusBoard


REQUEST_QUEUE = 128  # listen backlog: connections the kernel queues while the handlers are busy
READ_SECONDS = 5.0  # the whole request (line and headers) must arrive within this; also each write's limit
IDLE_SECONDS = 2.0  # its first byte within this: a scraper sends its request as soon as it has connected
MAX_HANDLERS = 64  # connections handled at once (a thread each); Prometheus, healthchecks and people need few
LAST_WORDS_SECONDS = 30.0  # the longest a failing service waits for its scraper (the stack's scrapes every 15 s)
# A client going away mid-request or mid-response (and the read deadline) ends its connection silently.
_DISCONNECTS = (ConnectionError, TimeoutError)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow scraper never keeps the process alive
    request_queue_size = REQUEST_QUEUE
    registry: CollectorRegistry
    board: StatusBoard

    def __init__(self, *args, **kwargs) -> None:
        self._places = threading.BoundedSemaphore(MAX_HANDLERS)
        self.scrapes = threading.Condition()  # the /metrics answers begun and the newest one served, by number
        self.begun = self.served = 0
        super().__init__(*args, **kwargs)

    def scrape_begins(self) -> int:
        with self.scrapes:
            self.begun += 1
            return self.begun

    def scrape_served(self, number: int) -> None:
        with self.scrapes:
            self.served = max(self.served, number)
            self.scrapes.notify_all()

    def process_request(self, request, client_address) -> None:
        """A thread for the connection, or, with ``MAX_HANDLERS`` busy, closed at once."""
        if not self._places.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nothing else gives the place back
            self._places.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._places.release()

    def handle_error(self, request, client_address) -> None:
        """socketserver prints a traceback for any exception in a handler; not for a disconnect."""
        if not isinstance(sys.exc_info()[1], _DISCONNECTS):
            super().handle_error(request, client_address)


class _Deadline(io.RawIOBase):
    """A socket's reading side that fails once ``deadline`` (monotonic) has passed: a socket
    timeout alone restarts with each byte that arrives."""

    def __init__(self, sock: socket.socket, deadline: float, first: float) -> None:
        self._sock, self._deadline, self._first = sock, deadline, first  # ``first``: the first byte's

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = min(self._deadline, self._first) - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"request not complete within {READ_SECONDS:g} s, or not begun within "
                               f"{IDLE_SECONDS:g} s")
        self._sock.settimeout(left)
        try:
            got = self._sock.recv_into(buffer)
            self._first = math.inf  # begun: the whole request's deadline alone from now on
            return got
        finally:
            self._sock.settimeout(READ_SECONDS)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = READ_SECONDS  # per socket operation, writes included (a client that stops reading)

    def setup(self) -> None:
        """One request per connection (HTTP/1.0), so one deadline per connection."""
        super().setup()
        self.rfile.close()  # socketserver's reader, replaced by one with a deadline
        now = time.monotonic()
        self.rfile = io.BufferedReader(_Deadline(self.connection, now + READ_SECONDS, now + IDLE_SECONDS))

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        scrape = self.server.scrape_begins() if self.path.split("?", 1)[0] == "/metrics" else None
        self._send(*self._answer())
        if scrape is not None:
            self.server.scrape_served(scrape)

    def do_HEAD(self) -> None:  # noqa: N802
        """GET's status and headers without the body: HTTP asks it of every server that answers GET,
        and uptime checkers and load balancers probe with it (``curl -I``); it was 501."""
        self._send(*self._answer(), body_too=False)

    def _answer(self) -> tuple[int, bytes, str]:
        """(status, body, content type) of the path asked for."""
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            return 200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST
        if path == "/healthz":
            healthy, reason = self.server.board.health()
            return 200 if healthy else 503, (reason + "\n").encode(), "text/plain; charset=utf-8"
        if path == "/status":
            body = json.dumps(self.server.board.snapshot(), indent=1, default=str) + "\n"
            return 200, body.encode(), "application/json"
        return 404, b"not found: try /metrics, /healthz or /status\n", "text/plain; charset=utf-8"

    def _send(self, code: int, body: bytes, content_type: str, body_too: bool = True) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body_too:
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
                                   "stop it or choose another port with --http.port N "
                                   "(make demo / train-local: PORT=N)") from None
            raise ServiceError(EXIT_PORT, f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from None
        self._server.registry, self._server.board = registry, board
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    def start(self) -> HttpEndpoint:
        self._thread.start()
        return self

    def last_words(self, going_on: Callable[[], bool], limit: float = LAST_WORDS_SECONDS) -> bool:
        """Wait until a ``/metrics`` scrape begun from now on has been served, so that the scraper has
        the values set before this call (the exit code), at most ``limit`` s and while ``going_on()``
        (a stop signal ends the wait).  Nothing to wait for when nothing has scraped ``/metrics`` (a
        run without Prometheus, the tests): False at once.  True when such a scrape was served."""
        server, deadline = self._server, time.monotonic() + limit
        with server.scrapes:
            mark = server.begun
            while mark and server.served <= mark and going_on() and (left := deadline - time.monotonic()) > 0:
                server.scrapes.wait(min(left, 0.2))  # 0.2: how soon a stop signal is seen
            return bool(mark) and server.served > mark

    def url(self, path: str) -> str:
        """The URL to print: for the wildcard address the loopback one, spelled like the default
        host (``127.0.0.1``: the address the README, the Docker stack and the defaults all name;
        the server listens on IPv4 only)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
