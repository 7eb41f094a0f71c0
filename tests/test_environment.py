"""The environment `make setup` builds: Pillow-SIMD in use, nothing installed over it, setup idempotent."""
from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import PIL
import pytest

from tests.conftest import ROOT


def test_pil_is_pillow_simd() -> None:
    assert md.version("Pillow-SIMD") == PIL.__version__
    with pytest.raises(md.PackageNotFoundError):
        md.version("Pillow")  # Pillow and Pillow-SIMD share the PIL package: only one may be installed
    files = {str(f) for f in md.files("Pillow-SIMD") or []}
    assert any(f.startswith("PIL/") for f in files) and Path(PIL.__file__).parent.name == "PIL"


def test_pinned_versions_are_the_ones_installed() -> None:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            assert md.version(name).split("+")[0] == version, name


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(), reason="runs inside the project's .venv only")
def test_setup_is_idempotent() -> None:
    stamp = ROOT / ".venv" / ".setup-done"
    before = stamp.stat().st_mtime_ns
    result = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "up to date" in result.stdout and stamp.stat().st_mtime_ns == before
