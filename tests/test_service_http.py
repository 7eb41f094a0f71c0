"""The HTTP endpoint under hostile clients, over real sockets, against a server in its own process
(so its stderr is a real one and the clients' threads do not share its interpreter): many
concurrent scrapers, a slowloris client, clients that hang up early, HEAD requests."""
from __future__ import annotations

import http.client
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVE = """
import sys, time
from service.metrics import ServiceMetrics, build_labels
from service.server import HttpEndpoint
from service.status import StatusBoard
metrics = ServiceMetrics(build_labels("cpu", "grouped", 1))
endpoint = HttpEndpoint("127.0.0.1", 0, metrics.registry, StatusBoard(60, phase="training")).start()
print(endpoint.port, flush=True)
sys.stdin.read()  # serve until the test closes stdin
endpoint.close()
"""


@pytest.fixture
def server():
    """(port, process) of a service HTTP endpoint in a child process; stderr kept for the test."""
    proc = subprocess.Popen([sys.executable, "-c", SERVE], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    yield port, proc
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=30)


def _stderr(proc: subprocess.Popen) -> str:
    proc.stdin.close()
    proc.wait(timeout=30)
    return proc.stderr.read()


def _scrape(port: int, path: str = "/metrics") -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        r.read()
        return r.status


def _listen_drops() -> int:
    """The kernel's count of connections dropped because a listen queue was full (this netns)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:]))
            return int(row["ListenOverflows"]) + int(row["ListenDrops"])
    raise AssertionError("no TcpExt counters in /proc/net/netstat")


@pytest.mark.slow
def test_twenty_concurrent_scrapers_are_all_accepted_at_once(server) -> None:
    """A backlog of 5 (socketserver's default) overflows under 20 simultaneous connects: the
    kernel drops the SYNs and the clients wait for a retransmit (1 s, 3 s, 7 s...)."""
    port, proc = server
    before = _listen_drops()
    barrier = threading.Barrier(20)

    def client(_: int) -> list[int]:
        codes = []
        for _ in range(30):
            barrier.wait()  # every round, 20 connects arrive together
            codes.append(_scrape(port))
        return codes

    with ThreadPoolExecutor(20) as pool:
        codes = [c for result in pool.map(client, range(20)) for c in result]
    assert codes == [200] * 600
    assert _listen_drops() - before == 0, "connections were dropped by a full listen queue"
    assert "Traceback" not in _stderr(proc)


@pytest.mark.slow
def test_a_slowloris_client_is_cut_off_while_scrapes_go_on(server) -> None:
    port, proc = server
    slow = socket.create_connection(("127.0.0.1", port))
    slow.settimeout(1.5)
    request, start, closed_after = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100, time.monotonic(), None
    codes = []
    for byte in request:  # one byte a second, for up to 25 s
        try:
            slow.sendall(bytes([byte]))
            if slow.recv(1) == b"":  # the server closed the connection
                closed_after = time.monotonic() - start
                break
        except TimeoutError:
            pass  # still open: the server is waiting for the rest of the request
        except (ConnectionResetError, BrokenPipeError):
            closed_after = time.monotonic() - start
            break
        codes.append(_scrape(port))  # other clients are served meanwhile
        if time.monotonic() - start > 25:
            break
    slow.close()
    assert closed_after is not None, "a client sending one byte a second was never cut off"
    assert closed_after < 20 and codes and set(codes) == {200}
    assert "Traceback" not in _stderr(proc)


def test_clients_that_hang_up_early_leave_stderr_clean(server) -> None:
    port, proc = server
    for i in range(40):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n" if i % 2 else b"GET /metr")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        s.close()
    time.sleep(1)  # let the handler threads meet the resets
    assert _scrape(port) == 200
    err = _stderr(proc)
    assert err == "", err


def _ask(port: int, method: str, path: str) -> tuple[int, str | None, str | None, bytes]:
    """(status, Content-Type, Content-Length, body) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type"), r.getheader("Content-Length"), r.read()
    finally:
        conn.close()


@pytest.mark.parametrize("path", ["/healthz", "/status", "/metrics", "/nope"])
def test_head_answers_as_get_does_without_the_body(server, path: str) -> None:
    """HEAD was 501 "Unsupported method" on every path: an uptime checker or a load balancer
    probing /healthz with HEAD (``curl -I`` does) saw a healthy trainer as broken.  HTTP requires
    a server that answers GET to answer HEAD: the same status and headers, no body."""
    port, proc = server
    get, head = _ask(port, "GET", path), _ask(port, "HEAD", path)
    assert head[:2] == get[:2] and head[3] == b"" and int(head[2]) > 0, (get[:3], head)
    if path == "/nope":  # the others change between two requests (the heartbeat's age, CPU seconds...)
        assert head[2] == get[2] == str(len(get[3])), (get[:3], head)
    assert "Traceback" not in _stderr(proc)


def test_printed_urls_use_the_address_the_readme_names() -> None:
    from service.metrics import ServiceMetrics, build_labels
    from service.server import HttpEndpoint
    from service.status import StatusBoard

    metrics = ServiceMetrics(build_labels("cpu", "grouped", 1))
    endpoint = HttpEndpoint("0.0.0.0", 0, metrics.registry, StatusBoard(60)).start()
    try:
        url = endpoint.url("/metrics")
        assert url == f"http://127.0.0.1:{endpoint.port}/metrics"
        assert _scrape(endpoint.port) == 200
    finally:
        endpoint.close()


def _threads(pid: int) -> int:
    """The threads of process ``pid`` now (the kernel's count: every thread, Python's or not)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line in /proc/{pid}/status")


def _answers(port: int, path: str, within: float) -> int:
    """The status of ``path``, asked again while the server refuses (over its cap), for ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        try:
            return _scrape(port, path)
        except OSError:  # closed unanswered (http.client's RemoteDisconnected is a ConnectionResetError)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_many_half_open_connections_cannot_multiply_the_threads(server) -> None:
    """Each connection had a thread of its own, held until its request's deadline: 3000 connections
    that never sent a byte (a port scanner, a stuck client) made 615 threads in the service.  Now
    at most ``MAX_HANDLERS`` connections are handled at once (more are closed unanswered) and one
    that sends nothing is cut after ``IDLE_SECONDS``; scrapes are answered meanwhile."""
    from service.server import IDLE_SECONDS, MAX_HANDLERS, READ_SECONDS

    port, proc = server
    with socket.create_connection(("127.0.0.1", port)) as silent:
        silent.settimeout(READ_SECONDS + 5)
        start = time.monotonic()
        assert silent.recv(1) == b""  # closed by the server
        assert time.monotonic() - start < IDLE_SECONDS + 1 < READ_SECONDS
    before = _threads(proc.pid)
    idle, most = [], before
    try:
        for _ in range(4 * MAX_HANDLERS):
            idle.append(socket.create_connection(("127.0.0.1", port)))  # connects, never sends
            most = max(most, _threads(proc.pid))
        time.sleep(0.5)  # let the server take every one of them
        most = max(most, _threads(proc.pid))
        # Still held open by this side: the server must answer others all the same.
        assert _answers(port, "/healthz", within=IDLE_SECONDS + 5) == 200
        assert _answers(port, "/metrics", within=IDLE_SECONDS + 5) == 200
    finally:
        for s in idle:
            s.close()
    assert most <= before + MAX_HANDLERS, (before, most)
    assert "Traceback" not in _stderr(proc)
