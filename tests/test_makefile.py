"""The Makefile's training target as a user runs it: what it echoes, and what a SIGTERM to the
terminal's process group does (real make, real service, tiny sizes)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service_proc import ROOT, TINY, checkpoint_steps


def test_train_local_echoes_its_command_on_one_line() -> None:
    out = subprocess.run(["make", "-n", "--no-print-directory", "train-local", "SHARDS=/s", "RUN=/r", "NPROC=2"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert not any(line.rstrip().endswith("\\") for line in out.splitlines()), out
    command = (".venv/bin/python -m service.launch --standalone --nproc-per-node 2 -m service "
               "--config configs/demo.toml --shards /s --out /r --http.port 9431")
    assert f"echo '{command}'" in out.splitlines() and f"exec {command}" in out.splitlines()


def test_predict_runs_the_predictor_on_the_images_or_says_it_needs_them() -> None:
    out = subprocess.run(["make", "-n", "--no-print-directory", "predict", "IMAGES=a.jpg b.png", "RUN=/r"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert ".venv/bin/python -m service.predict --run '/r' a.jpg b.png" in out.splitlines()
    # A run named with a space and a quote is one argument; RUN= (empty) took the first image as the run.
    spaced = subprocess.run(["make", "-n", "--no-print-directory", "predict", "IMAGES=a.jpg", "RUN=my run's"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert ".venv/bin/python -m service.predict --run 'my run'\\''s' a.jpg" in spaced.splitlines(), spaced
    empty = subprocess.run(["make", "-n", "-B", "--no-print-directory", "predict", "IMAGES=a.jpg", "RUN="], cwd=ROOT,
                           capture_output=True, text=True)
    assert empty.returncode == 2 and "make predict: RUN is empty; give the run directory" in empty.stderr, empty
    # -B: setup counts as out of date; the missing IMAGES is said before anything would run
    missing = subprocess.run(["make", "-n", "-B", "--no-print-directory", "predict"], cwd=ROOT, capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "make predict needs IMAGES, the image files to classify" in missing.stderr
    assert not missing.stdout, missing.stdout


@pytest.mark.slow
def test_a_group_sigterm_lets_the_service_checkpoint_before_make_ends(sample_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    make = subprocess.Popen(
        ["make", "--no-print-directory", "train-local", f"SHARDS={sample_shards}", f"RUN={run}", "PORT=0",
         "TRAIN_ARGS=" + " ".join([*TINY, "--epochs", "1"])],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)  # its own process group, as a terminal's foreground job
    lines = []
    for line in make.stdout:
        lines.append(line.rstrip("\n"))
        if "epoch 1 step 1/6" in line:
            os.killpg(make.pid, signal.SIGTERM)  # make, its shell and the service, as a closing terminal
            break
    lines += make.stdout.read().splitlines()
    rc = make.wait(timeout=120)
    echoed = [ln for ln in lines if ln.startswith(".venv/bin/python")]
    assert len(echoed) == 1 and echoed[0].endswith("--epochs 1"), lines
    stopped = next(ln for ln in lines if ln.startswith("stopped (SIGTERM) at step"))
    assert checkpoint_steps(run) == [int(stopped.split()[4].rstrip(","))], "\n".join(lines)
    # GNU make waits for the service (its checkpoint), then dies of the signal itself (143 in a
    # shell) although the service exited 0: the README says so and names the command to run instead.
    assert rc == -signal.SIGTERM, (rc, make.stderr.read())


def test_the_suite_keeps_only_the_failed_tests_temporary_directories(tmp_path: Path) -> None:
    """The project's pytest settings, on two throwaway tests that each write 1 MB to tmp_path."""
    (tmp_path / "test_two.py").write_text(
        "def test_passes(tmp_path):\n    (tmp_path / 'blob').write_bytes(bytes(1 << 20))\n\n"
        "def test_fails(tmp_path):\n    (tmp_path / 'blob').write_bytes(bytes(1 << 20))\n    assert False\n")
    root = tmp_path / "temproot"
    root.mkdir()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path / "test_two.py")],
                          env={**os.environ, "PYTEST_DEBUG_TEMPROOT": str(root)}, capture_output=True, text=True)
    assert "1 failed, 1 passed" in done.stdout, done.stdout + done.stderr
    kept = sorted(p.parent.name for p in root.rglob("blob"))
    assert kept == ["test_fails0"], kept


def test_demo_serves_on_the_port_make_is_given() -> None:
    """The taken-port error says `PORT=N`: make demo must honour it as train-local does."""
    out = subprocess.run(["make", "-n", "--no-print-directory", "demo", "PORT=9500"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    service = [line for line in out.splitlines() if " -m service --config configs/demo.toml" in line]
    assert len(service) == 1 and "--http.port 9500" in service[0], out


def _as_in_a_terminal() -> None:
    """SIGINT's default action, as a terminal's job has: a test run started in the background (``make
    test &``, nohup) inherits SIGINT ignored, and make ignoring it reported its child's death by
    the signal as an error (``*** [...] Interrupt``, exit 2) instead of dying of it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_of_train_local_on_two_ranks_is_the_ranks_stop_alone(sample_shards: Path, tmp_path: Path) -> None:
    """``make train-local NPROC=2`` and Ctrl-C (SIGINT to the terminal's foreground group): the
    ranks checkpointed, then torchrun printed its W lines, a traceback ending ``SignalException:
    Process N got signal: 2`` and exited 1, and make added ``*** ... Error 1``.  Now the launcher
    (``service.launch``) ends quietly: the ranks' ``stopped (SIGINT)`` line is the last word, and
    make dies of the signal as with one process."""
    run = tmp_path / "run"
    make = subprocess.Popen(
        ["make", "--no-print-directory", "train-local", f"SHARDS={sample_shards}", f"RUN={run}", "PORT=0", "NPROC=2",
         "TRAIN_ARGS=" + " ".join([*TINY, "--epochs", "1", "--loader.shuffle_buffer", "16"])],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, preexec_fn=_as_in_a_terminal)
    lines = []
    for line in make.stdout:
        lines.append(line.rstrip("\n"))
        if "epoch 1 step 1/" in line:
            os.killpg(make.pid, signal.SIGINT)
            break
    lines += make.stdout.read().splitlines()
    rc, errors = make.wait(timeout=120), make.stderr.read()
    stopped = next(ln for ln in lines if ln.startswith("stopped (SIGINT) at step"))
    assert checkpoint_steps(run) == [int(stopped.split()[4].rstrip(","))], "\n".join(lines)
    assert "Traceback" not in errors and "SignalException" not in errors and "Error 1" not in errors, errors
    assert not [ln for ln in errors.splitlines() if ln.startswith("W")], errors  # torchrun's warnings
    assert rc == -signal.SIGINT, (rc, errors)


@pytest.mark.slow
def test_the_launcher_ends_with_the_ranks_own_exit_code(sample_shards: Path, tmp_path: Path) -> None:
    """A taken port is exit 3 from one process; under torchrun it was torchrun's exit 1 after the
    ranks' line and a ChildFailedError report.  The launcher gives the ranks' code, and no report."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "service.launch", "--standalone", "--nproc-per-node", "2",
                               "-m", "service", "--shards", str(sample_shards), "--out", str(tmp_path / "run"),
                               *TINY, "--http.port", str(port)],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                              timeout=180)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-3000:]
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr, done.stderr
    assert not [ln for ln in done.stderr.splitlines() if ln[:1] in ("W", "E")], done.stderr  # torchrun's log lines
