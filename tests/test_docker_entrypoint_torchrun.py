"""docker/entrypoint.sh for real: the real torchrun (2 gloo ranks on the CPU) and the real service,
stopped as ``docker stop`` stops it (SIGTERM through tini), with a stop that outlasts torchrun's
30 s shutdown timeout.

The entrypoint passes a stop signal to torchrun's ranks, not to torchrun, because torchrun
answering a signal SIGKILLs its ranks 30 s later (torch.distributed.elastic's shutdown_timeout),
which would cut a slow checkpoint write short (an ImageNet checkpoint, ~490 MB, takes ~61 s at
8 MB/s).  ``tests/test_docker_entrypoint.py`` checks that with stand-in scripts; this checks it
with the processes themselves, so a torchrun or service change that breaks it shows here."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.procs import alive, cmdline, descendants, kill_all
from tests.service_proc import ROOT, STEPS_PER_EPOCH, TINY, checkpoint_steps, events, free_port
from tests.test_docker_entrypoint import DOCKER, _as_in_a_container

pytestmark = pytest.mark.slow
FROZEN_SECONDS = 35  # longer than torchrun's shutdown timeout (30 s), well within compose's stop_grace_period (90 s)
STEPS_2_RANKS = STEPS_PER_EPOCH // 2  # 144 training images / 2 ranks / batch 24
# TINY without its --http.host/--http.port: the entrypoint sets those from HTTP_HOST/HTTP_PORT.
ARGS = tuple(word for pair in zip(TINY[::2], TINY[1::2]) if not pair[0].startswith("--http.") for word in pair)


class Entrypoint:
    """docker/entrypoint.sh with NPROC=2 as tini starts it (SIGINT not ignored), in a session of
    its own; its output goes to files (a pipe nobody reads would stall the ranks)."""

    def __init__(self, tmp_path: Path, name: str, port: int, *args: str) -> None:
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
               "NPROC": "2", "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port),
               "ALEXNET_EXIT_FILE": str(tmp_path / "exit-code"), "PROBE_FILE": str(tmp_path / "probe")}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([str(DOCKER / "entrypoint.sh"), *args], cwd=ROOT, env=env, stdout=out,
                                         stderr=err, preexec_fn=_as_in_a_container, start_new_session=True)
        self.port = port
        self.ranks: dict[int, int] = {}

    def output(self) -> str:
        return f"stdout:\n{self.out.read_text()[-3000:]}\nstderr:\n{self.err.read_text()[-3000:]}"

    def find_ranks(self) -> dict[int, int]:
        """RANK -> pid of torchrun's rank processes (torchrun's own environment has no RANK)."""
        for pid in descendants(self.proc.pid):
            if "-m service" in cmdline(pid) and (rank := _environ(pid).get("RANK")) is not None:
                self.ranks[int(rank)] = pid
        return self.ranks

    def kill(self) -> None:
        """Everything it started, the ranks too should torchrun be gone (then they are not below it)."""
        kill_all(self.proc)
        for pid in self.ranks.values():
            with contextlib.suppress(ProcessLookupError):
                if alive(pid) and "-m service" in cmdline(pid):
                    os.kill(pid, signal.SIGKILL)


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _status(port: int) -> dict | None:
    """A rank's /status, or None when it does not answer (not up yet, frozen, or gone)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


def _wait_training(run: Entrypoint, timeout: float = 240) -> None:
    """Until both ranks' /status says they are training (each has finished a step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = [_status(run.port + rank) for rank in (0, 1)]
        if all(s is not None and s["phase"] == "training" for s in statuses):
            return
        assert run.proc.poll() is None, f"the entrypoint exited {run.proc.returncode}\n{run.output()}"
        time.sleep(0.1)
    raise AssertionError(f"the ranks were not both training within {timeout} s\n{run.output()}")


def _frozen(run: Entrypoint, rank: int, seconds: float) -> list[dict | None]:
    """SIGSTOP ``rank`` for ``seconds`` (then SIGCONT), scraping rank 0's /status every second."""
    os.kill(run.ranks[rank], signal.SIGSTOP)
    seen, until = [], time.monotonic() + seconds
    try:
        while time.monotonic() < until:
            time.sleep(min(1.0, max(until - time.monotonic(), 0)))
            seen.append(_status(run.port))
    finally:
        with contextlib.suppress(ProcessLookupError):  # SIGKILLed meanwhile: what the test looks for
            os.kill(run.ranks[rank], signal.SIGCONT)
    return seen


def _phases_until_exit(run: Entrypoint, timeout: float = 120) -> list[str]:
    """Rank 0's /status phases, each once in the order seen, until the entrypoint exits."""
    phases, deadline = [], time.monotonic() + timeout
    while run.proc.poll() is None and time.monotonic() < deadline:
        status = _status(run.port)
        if status is not None and phases[-1:] != [status["phase"]]:
            phases.append(status["phase"])
        time.sleep(0.02)
    return phases


def test_a_stop_that_outlasts_torchruns_shutdown_timeout_checkpoints_and_exits_0(sample_shards: Path, tmp_path: Path) -> None:
    """docker stop's SIGTERM, and rank 1 frozen (SIGSTOP) for 35 s at once: a stand-in for a slow
    disk, the point being a rank whose stop outlasts torchrun's 30 s shutdown timeout.  Told
    directly, the ranks checkpoint and exit 0 once rank 1 runs again, torchrun sees its workers
    succeed and the entrypoint exits 0.  Had torchrun got the signal, it would have SIGKILLed
    both ranks 30 s in (no ``stopped`` record, torchrun's exit 1, the container's exit 1).

    While rank 1 is frozen, rank 0 waits for it in a collective of its next step (DDP's), before
    any rank can agree to stop (the agreement is a collective too): its /status answers, phase
    "training", its heartbeat ageing.  Then the stop's phases: "checkpointing", which lasts through
    the write (a stop awaits it: on a slow disk, the long phase), then "stopping" (the last collectives,
    ~0.4 s) and "stopped" (until the endpoint closes, milliseconds)."""
    out, port = tmp_path / "run", free_port(2)
    args = ("--shards", str(sample_shards), "--out", str(out), *ARGS, "--epochs", "1")
    run = Entrypoint(tmp_path, "first", port, *args)
    try:
        _wait_training(run)
        assert sorted(run.find_ranks()) == [0, 1], run.output()
        run.proc.send_signal(signal.SIGTERM)  # what tini passes on from docker stop
        sent = time.monotonic()
        frozen = _frozen(run, 1, FROZEN_SECONDS)
        phases = _phases_until_exit(run)
        code, took = run.proc.wait(timeout=60), time.monotonic() - sent
    finally:
        run.kill()
    assert code == 0, f"exit {code}, seen {took:.0f} s after the stop signal\n{run.output()}"
    assert FROZEN_SECONDS < took < 90, took  # past torchrun's shutdown timeout, within compose's grace period
    assert (tmp_path / "probe").read_text().split() == ["2", "127.0.0.1", str(port)]
    assert all(s is not None and s["phase"] == "training" for s in frozen), frozen
    assert frozen[-1]["heartbeat_age_seconds"] > FROZEN_SECONDS - 10, frozen[-1]
    # "checkpointing" lasts the write (1 s here); "stopping" ~0.4 s, which a poll may miss: in order if seen.
    assert "checkpointing" in phases, phases
    after = phases[phases.index("checkpointing") + 1:]
    assert after in ([], ["stopping"], ["stopping", "stopped"], ["stopped"]), phases
    stopped = [events(out, "stopped", rank) for rank in (0, 1)]  # written last: no rank was killed
    assert all(len(s) == 1 and s[0]["reason"] == "SIGTERM" for s in stopped), f"{stopped}\n{run.output()}"
    step = stopped[0][0]["step"]
    assert stopped[1][0]["step"] == step and stopped[0][0]["param_digest"] == stopped[1][0]["param_digest"]
    assert 0 < step <= STEPS_2_RANKS and checkpoint_steps(out)[-1] == step
    _resumes(tmp_path, args, out / f"checkpoint-{step:09d}.pt", step)


def _resumes(tmp_path: Path, args: tuple[str, ...], checkpoint: Path, step: int) -> None:
    """The same command again: both ranks resume from the stop's checkpoint and finish the epoch."""
    run = Entrypoint(tmp_path, "again", free_port(2), *args)
    try:
        code = run.proc.wait(timeout=300)
    finally:
        run.kill()
    out = checkpoint.parent
    assert code == 0, run.output()
    assert f"from {checkpoint}" in run.out.read_text(), run.output()
    starts = [events(out, "start", rank)[-1] for rank in (0, 1)]
    assert all(s["resumed_from"] == str(checkpoint) and s["step"] == step for s in starts), starts
    assert [events(out, "finished", rank)[-1]["step"] for rank in (0, 1)] == [STEPS_2_RANKS] * 2


def test_a_ranks_diagnosed_error_ends_the_output_with_its_line_and_code(sample_shards: Path, tmp_path: Path) -> None:
    """Rank 0's port taken (exit 3, one line): torchrun printed its ``ChildFailedError`` report
    (a traceback-like table) after the line, so ``make train NPROC=2``'s log ended with torchrun's
    words.  The launcher (``service.launch``) leaves the ranks' lines last, and the code is 3."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = Entrypoint(tmp_path, "taken", port, "--shards", str(sample_shards), "--out", str(tmp_path / "run"), *ARGS)
        try:
            code = run.proc.wait(timeout=240)
        finally:
            run.kill()
    err = run.err.read_text()
    assert code == 3 and (tmp_path / "exit-code").read_text() == "3\n", f"exit {code}\n{run.output()}"
    assert "ChildFailedError" not in err and "Traceback" not in err, run.output()
    assert f"port {port} on 127.0.0.1 is already in use" in err, run.output()
    # The ranks' lines alone (rank 1 may say its peer is gone), none of torchrun's W/E log lines.
    assert all(line.startswith("service: ") for line in err.splitlines()), run.output()
