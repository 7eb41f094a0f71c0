"""``--help`` of the entry points: every setting with its type, default and the comment that
documents it where it is declared (``common.config_help``)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from common.config import field_types
from common.config_help import field_notes, settings_help, wants_help
from service.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in field_types(cls).items():
        out += keys(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [prefix + name]
    return out


@pytest.mark.parametrize("entry", ["service", "shards", "sampledata"])
def test_help_exits_0_and_lists_every_setting(entry: str) -> None:
    run = subprocess.run([sys.executable, "-m", entry, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert run.stdout.startswith(f"usage: python -m {entry} [--config FILE.toml]")
    if entry == "service":
        listed = [line.split()[0] for line in run.stdout.splitlines() if line.startswith("  --")]
        assert listed == [f"--{k}" for k in keys(TrainConfig)]
        assert "  --loader.handover host|stream  (default host)\n" in run.stdout
        assert "  --model.devices A,B,...  (default \"\")\n" in run.stdout
        assert "[model]  Which AlexNet layout, where, and how fast" in run.stdout
        # the comments above a field and on its line, wrapped under it
        assert "      \"grouped\" (one device), \"towers\" (one tower per device) or \"auto\"" in run.stdout
        assert "      9400 is dcgm-exporter's; 0 = any free port (printed at start)\n" in run.stdout


def test_a_missing_value_is_still_an_error_and_help_as_a_value_is_a_value() -> None:
    run = subprocess.run([sys.executable, "-m", "service", "--epochs"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and run.stderr == "service: command line: --epochs needs a value\n"
    assert wants_help(["--epochs", "3", "-h"]) and wants_help(["--help"])
    assert not wants_help(["--out", "--help"]) and not wants_help(["--epochs=3"])


@dataclass(frozen=True)
class Example:
    """An example."""

    # above, first line
    # above, second line
    plain: str = "a # not a comment"  # its own line
    bare: int = 1
    choice: Literal["x", "y"] = "x"

    def method(self) -> None:  # not a field
        pass


def test_notes_are_the_comments_of_each_field_and_nothing_else() -> None:
    assert field_notes(Example) == {"plain": "above, first line above, second line its own line", "bare": "",
                                    "choice": ""}
    text = settings_help(Example, "prog", "What it does.")
    assert "  --plain STR  (default a # not a comment)\n      above, first line above, second line its own line" in text
    assert "  --bare INT  (default 1)\n  --choice x|y  (default x)\n" in text


@pytest.mark.parametrize("module", ["service", "shards", "sampledata"])
def test_help_into_a_closed_pipe_ends_quietly(module: str) -> None:
    """``python -m shards --help | head -1`` ended in a BrokenPipeError traceback, exit 1, about
    half the time (when head had gone before the write); the reader here is gone before it."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", module, "--help"], stdout=write, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, ""), done.stderr
