"""Docker HEALTHCHECK: exit 0 when every local rank's /healthz answers 200, else 1.

Rank r serves on port + r.  entrypoint.sh records how many ranks this node runs and the host and
port the service really uses (a --http.port in the command line wins over HTTP_PORT); without
that record, HTTP_HOST and HTTP_PORT.
"""
import os
import sys
import urllib.request


def target() -> tuple[int, str, int]:
    """(ranks, host, base port) to probe."""
    try:
        with open(os.environ.get("PROBE_FILE", "/tmp/alexnet-probe")) as f:
            n, host, p = f.read().split()
        nproc, port = int(n), int(p)
    except (OSError, ValueError):
        nproc, host, port = 1, os.environ.get("HTTP_HOST", "127.0.0.1"), int(os.environ.get("HTTP_PORT", "9431"))
    if host in ("", "0.0.0.0"):  # listening everywhere: loopback reaches it
        host = "127.0.0.1"
    return nproc, host, port


def main() -> int:
    nproc, host, port = target()
    for rank in range(nproc):
        url = f"http://{host}:{port + rank}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                status = response.status
        except OSError as exc:  # HTTPError (503: stalled) and connection errors
            print(f"rank {rank}: {url}: {exc}")
            return 1
        if status != 200:
            print(f"rank {rank}: {url}: HTTP {status}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
