"""Docker HEALTHCHECK: exit 0 when every local rank's /healthz answers 200, else 1.

Rank r serves on HTTP_PORT + r; entrypoint.sh records how many ranks this node runs.
"""
import os
import sys
import urllib.request


def main() -> int:
    host = os.environ.get("HTTP_HOST", "127.0.0.1")
    if host in ("", "0.0.0.0"):  # listening everywhere: loopback reaches it
        host = "127.0.0.1"
    port = int(os.environ.get("HTTP_PORT", "9431"))
    try:
        with open(os.environ.get("NPROC_FILE", "/tmp/alexnet-nproc")) as f:
            nproc = int(f.read())
    except (OSError, ValueError):
        nproc = 1
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
