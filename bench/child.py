"""Child processes with a time limit, for ``make gpu-check`` and its sweep: each measured thing
runs in its own process group, so a crash, a hang or a CUDA error takes down only itself, and a
timeout kills everything it started.  A child also dies with the process that started it: in a
session of its own, it would otherwise outlive a parent killed from outside (``kill -9``, an
out-of-memory kill) and go on using the GPU.  That covers the child itself (a sweep's
configuration, a part's last command, which bash runs in its own place), not processes the child
forked before (the first command of a part's ``a && b``): those go with the child's process group,
which a parent still alive kills on a stop (``bench.gpu_check``)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

from common import parent_death

ROOT = Path(__file__).resolve().parents[1]


def slug(name: str) -> str:
    """A file name for a configuration's name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:80]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: the repository importable, output unbuffered."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(extra or {})}


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``argv`` in a new process group, stdout and stderr into ``log``."""
    with log.open("w") as handle:
        return subprocess.Popen(argv, cwd=ROOT, env=env or child_env(), stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_dies_with(os.getpid()))


def _dies_with(parent: int):
    """What the child runs between fork and exec (Linux): SIGKILL when ``parent`` (its starting
    thread) ends, and exit at once if it ended already, before the request was made.  A kernel
    (or sandbox) that refuses the request costs only that guarantee: the child runs, as it would
    anywhere else, rather than every part of a GPU run failing at its start."""
    if not parent_death.AVAILABLE:
        return None

    def request() -> None:
        parent_death.ask_for_signal(signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
    return request


def reap(proc: subprocess.Popen, limit: float) -> int | None:
    """Wait up to ``limit`` seconds; the exit code, or None after killing the group on a timeout."""
    try:
        return proc.wait(timeout=max(limit, 1.0))
    except subprocess.TimeoutExpired:
        kill(proc)
        return None


def kill(*procs: subprocess.Popen) -> None:
    """SIGKILL each process group (all each started) that still runs, all of them first, then
    reap them: a GPU process can take seconds to go, and they go together."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in procs:
        proc.wait()


def write_json(path: Path, value: dict) -> Path:
    """``value`` as ``path``, whole or not at all (a reader, the parent after a kill, never sees
    half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)
    return path


def failure(code: int | None, limit: float, log_text: str, lines: int = 25) -> str:
    """One error text: how the child ended and the end of its log."""
    if code is None:
        how = f"timed out after {limit:.0f} s"
    elif code < 0:
        how = f"killed by signal {-code} ({signal.Signals(-code).name})"
    else:
        how = f"exit code {code}"
    return how + "\n" + "\n".join(log_text.strip().splitlines()[-lines:])
