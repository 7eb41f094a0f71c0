"""Input files the service cannot use are one line naming the file and what to do, with the
documented exit code (2: a setting, 1: the data), never a traceback: a config file that is not
UTF-8 or cannot be read, a ``manifest.json`` that cannot be read, is not UTF-8 or JSON or lacks a
key, dataset statistics that are not JSON or a truncated mean image.  Real service processes on
copies of the sample shards.

Root reads any file whatever its mode, so "cannot be read" runs the service in a user namespace
of its own (``unshare --user``: the files' owner bits then apply to it), skipped where that is not
allowed."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.errors import EXIT_CONFIG, EXIT_DATA

ROOT = Path(__file__).resolve().parents[1]


def service(*args: str, unreadable: Path | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    """``python -m service args`` to its end; ``unreadable``: a file made unreadable to it (mode 0);
    ``env``: variables added to its environment (torchrun's, for one rank of several)."""
    prefix: list[str] = []
    if unreadable is not None:
        unreadable.chmod(0)
        if os.getuid() == 0:
            prefix = ["unshare", "--user"]
            probe = subprocess.run([*prefix, "cat", str(unreadable)], capture_output=True, text=True)
            if probe.returncode == 0 or "Permission denied" not in probe.stderr:
                pytest.skip(f"no user namespace to make a file unreadable to root here ({probe.stderr.strip()})")
    cmd = [*prefix, sys.executable, "-m", "service", *args, "--http.port", "0", "--epochs", "1"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def one_line(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("service: "), line
    return line


@pytest.fixture
def shards(sample_shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(sample_shards, copy)
    return copy


@pytest.mark.parametrize("how", ["not UTF-8", "unreadable"])
def test_a_config_file_it_cannot_read_is_one_line_and_exit_2(how: str, tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_bytes(b'name = "caf\xe9"\n' if how == "not UTF-8" else b"epochs = 1\n")  # Latin-1, not UTF-8
    result = service("--config", str(toml), "--out", str(tmp_path / "run"),
                     unreadable=toml if how == "unreadable" else None)
    line = one_line(result, EXIT_CONFIG)
    said = "not UTF-8 text (byte 11" if how == "not UTF-8" else "cannot be read (Permission denied)"
    assert str(toml) in line and said in line, line
    assert not (tmp_path / "run").exists()  # a setting: nothing started


def test_a_quoted_number_in_a_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """``batch_size = "24"`` went through the command line's string parser and trained at 24."""
    toml = tmp_path / "run.toml"
    toml.write_text('[loader]\nbatch_size = "24"\n')
    line = one_line(service("--config", str(toml), "--out", str(tmp_path / "run")), EXIT_CONFIG)
    assert line == (f"service: {toml}: loader.batch_size must be int (a TOML number, without quotes), "
                    "got the string '24'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", ["unreadable", "not UTF-8", "not JSON", "no classes"])
def test_a_manifest_it_cannot_use_is_one_line_and_exit_1(how: str, shards: Path, tmp_path: Path) -> None:
    path = shards / "manifest.json"
    record = json.loads(path.read_text())
    if how == "not UTF-8":
        path.write_bytes(path.read_bytes().replace(b'"format"', b'"\xff"', 1))
    elif how == "not JSON":
        path.write_text(path.read_text()[:100])  # cut short, as a full disk leaves it
    elif how == "no classes":
        del record["classes"]
        path.write_text(json.dumps(record))
    result = service("--shards", str(shards), "--out", str(tmp_path / "run"),
                     unreadable=path if how == "unreadable" else None)
    line = one_line(result, EXIT_DATA)
    said = {"unreadable": "cannot be read (Permission denied)", "not UTF-8": "is not UTF-8 text",
            "not JSON": "is not valid JSON", "no classes": "lacks the required key 'classes'"}[how]
    assert f"{path} {said}" in line, line


@pytest.mark.parametrize("how", ["truncated mean image", "stats not JSON"])
def test_statistics_it_cannot_use_are_one_line_and_exit_1(how: str, shards: Path, tmp_path: Path) -> None:
    path = shards / ("mean_image.npy" if how == "truncated mean image" else "stats.json")
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])  # as an interrupted copy leaves it
    result = service("--shards", str(shards), "--out", str(tmp_path / "run"))
    line = one_line(result, EXIT_DATA)
    said = "cannot be read as the mean image" if how == "truncated mean image" else "is not valid JSON"
    assert f"{path} {said}" in line, line
    assert f"re-run the sharding, `make shards SRC=<imagenet> OUT={shards}`" in line, line


@pytest.mark.parametrize("key", ["eigval", "std", "mean_image"])
def test_statistics_that_are_not_finite_are_one_line_and_exit_1(key: str, shards: Path, tmp_path: Path) -> None:
    """A NaN in stats.json (Python's JSON reads one) or an infinity in the mean image made every
    step's loss NaN: the run ended exit 6, "training diverged ... Lower optim.lr"."""
    if key == "mean_image":
        path, image = shards / "mean_image.npy", np.load(shards / "mean_image.npy")
        image[7, 9, 1] = np.inf
        np.save(path, image)
    else:
        path, record = shards / "stats.json", json.loads((shards / "stats.json").read_text())
        record[key][0] = math.nan
        path.write_text(json.dumps(record))  # writes NaN, as json.dumps does by default
    line = one_line(service("--shards", str(shards), "--out", str(tmp_path / "run")), EXIT_DATA)
    assert f"{path} holds a value that is not a finite number ({key})" in line, line
    assert f"re-run the sharding, `make shards SRC=<imagenet> OUT={shards}`" in line, line


@pytest.mark.parametrize("given", ["the images", "a file", "a missing directory"])
def test_shards_that_are_no_shard_directory_are_one_line_and_nothing_is_created(
        given: str, sample_src: Path, tmp_path: Path) -> None:
    """The images themselves get the command that shards them into another directory (before: the
    hint to write shards into the image folder); and the line comes before anything is printed or
    left behind (before: the metrics URLs, the run directory line and an empty log.jsonl came first;
    the run directory, checked first, is removed again when this start created it)."""
    path = {"the images": sample_src, "a file": ROOT / "README.md", "a missing directory": tmp_path / "nope"}[given]
    run = tmp_path / "run"
    line = one_line(service("--shards", str(path), "--out", str(run)), EXIT_DATA)
    assert not run.exists() and str(path) in line
    if given == "the images":
        assert f"make shards SRC={path} OUT=<a new directory>" in line


@pytest.mark.parametrize("devices", ["cuda:0", "", "cpu,cpu,cpu"])
def test_model_devices_not_two_is_one_line_and_exit_2(devices: str, tmp_path: Path) -> None:
    """One device (or none, or three) where towers need two: the grouped-layout check indexed the
    second one and the start ended in an IndexError traceback, exit 1."""
    run = tmp_path / "run"
    line = one_line(service("--model.devices", devices, "--out", str(run)), EXIT_CONFIG)
    assert "model.devices must be two devices (e.g. cuda:0,cuda:1) or empty" in line, line
    assert not run.exists()


def test_a_loader_seed_the_service_would_not_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """The service seeds every rank's pipeline from ``seed`` (``service.build.resolve``): a
    ``loader.seed`` of its own was replaced without a word, and the run trained on seed 0's order."""
    run = tmp_path / "run"
    line = one_line(service("--loader.seed", "5", "--out", str(run)), EXIT_CONFIG)
    assert "loader.seed 5 is not used by the service" in line and "--seed 5" in line, line
    assert not run.exists()


@pytest.mark.parametrize("momentum", ["1", "2"])
def test_a_momentum_of_1_or_more_is_one_line_and_exit_2(momentum: str, tmp_path: Path) -> None:
    """The velocity is multiplied by the momentum every step: at 1 it never decays, above it grows
    without bound.  Both were accepted and trained on until the loss diverged (exit 6, the epochs
    before it spent); now refused with the other settings, before the shards are read (here: none)."""
    run = tmp_path / "run"
    line = one_line(service("--optim.momentum", momentum, "--shards", str(tmp_path / "no-shards"),
                            "--out", str(run)), EXIT_CONFIG)
    assert f"optim.momentum must be a number in [0, 1), got {float(momentum)}" in line, line
    assert not run.exists()


def test_an_empty_http_host_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """An empty host is the wildcard address to ``bind``: ``--http.host "$HTTP_HOST"`` with the
    variable set but empty served the metrics on every interface of the machine, unasked."""
    run = tmp_path / "run"
    line = one_line(service("--http.host", "", "--shards", str(tmp_path / "no-shards"), "--out", str(run)),
                    EXIT_CONFIG)
    assert "http.host is empty: give 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)" in line, line
    assert not run.exists()


@pytest.mark.parametrize("layout", ["grouped", "auto"])
def test_model_devices_the_grouped_layout_would_not_use_are_one_line_and_exit_2(layout: str, sample_shards: Path,
                                                                                tmp_path: Path) -> None:
    """The grouped layout runs on ``device``; towers' ``model.devices`` were dropped without a word
    (``layout auto`` is grouped under torchrun and on fewer than two GPUs): cuda:1,cuda:1 trained on
    cuda:0.  Here the devices name a GPU and the run's device is the CPU: the line was that no GPU
    is visible, as if the devices were going to be used."""
    run = tmp_path / "run"
    line = one_line(service("--device", "cpu", "--model.layout", layout, "--model.devices", "cuda:0,cuda:0",
                            "--shards", str(sample_shards), "--out", str(run)), EXIT_CONFIG)
    assert "model.devices cuda:0,cuda:0 are not used: model.layout grouped runs on device cpu" in line, line
    assert "give --device cuda:0, or --model.layout towers" in line, line


def test_an_lr_that_is_0_in_float32_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """``optim.lr 1e-50`` passed "> 0", but the update's float32 arithmetic makes it 0: every step
    a no-op for the whole run, which ``optim.lr 0`` is refused for."""
    run = tmp_path / "run"
    line = one_line(service("--optim.lr", "1e-50", "--shards", str(tmp_path / "no-shards"), "--out", str(run)),
                    EXIT_CONFIG)
    assert "optim.lr must be a number > 0 (float32's 1.175e-38 to 3.403e+38), got 1e-50" in line, line


@pytest.mark.parametrize("decay, momentum, product, limit, below",
                         [("400", "0.9", "4", "3.8", "380"), ("200", "0", "2", "2", "200")])
def test_a_weight_decay_that_diverges_alone_is_one_line_and_exit_2(decay: str, momentum: str, product: str,
                                                                   limit: str, below: str, sample_shards: Path,
                                                                   tmp_path: Path) -> None:
    """The paper's rule decays each weight by ``lr * weight_decay`` per step into the velocity: at
    ``2 * (1 + momentum)`` or more that alone flips and grows every weight (``model.optim.decay_bound``).
    ``optim.weight_decay 400`` at lr 0.01 started: at batch 24 the loss was 1.8e23, then nan, by step 5
    (exit 6, "lower optim.lr"); here, one step per epoch, the run ended 0 on its wrecked weights.  Now
    refused with the other settings, before a run directory."""
    run = tmp_path / "run"
    line = one_line(service("--optim.weight_decay", decay, "--optim.momentum", momentum, "--shards",
                            str(sample_shards), "--out", str(run)), EXIT_CONFIG)
    assert (f"optim.lr 0.01 x optim.weight_decay {decay} = {product} is at least 2 x (1 + optim.momentum {momentum}) = "
            f"{limit}") in line, line
    assert f"give --optim.weight_decay below {below}" in line, line
    assert not run.exists()


def test_a_weight_decay_that_diverges_at_the_ranks_scaled_lr_is_one_line_and_exit_2(sample_shards: Path,
                                                                                    tmp_path: Path) -> None:
    """Under torchrun the lr is ``optim.lr`` scaled by the number of ranks (``optim.lr_scaling``):
    weight decay 200 at lr 0.01 is inside the bound on one rank (2 < 3.8), past it at two ranks'
    0.02 (4).  Every rank refuses from torchrun's variables, before joining and before its run
    directory: here rank 0 of 2 alone, whose peer never comes."""
    run = tmp_path / "run"
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    line = one_line(service("--optim.weight_decay", "200", "--shards", str(sample_shards), "--out", str(run), env=env),
                    EXIT_CONFIG)
    assert ("optim.lr 0.01 x 2 (the linear rule, 2 ranks) x optim.weight_decay 200 = 4 is at least "
            "2 x (1 + optim.momentum 0.9) = 3.8") in line, line
    assert "give --optim.weight_decay below 190" in line, line
    assert not run.exists()
