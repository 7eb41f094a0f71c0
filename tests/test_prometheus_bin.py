"""The Prometheus the tests run is the series docker/compose.yaml pins, and tests/prometheus_bin.py,
which fetches it from Debian sid, checks what it downloads and fails in one line when it cannot.

The fetch is exercised against a small archive on disk (file:// URLs): real .debs built with
dpkg-deb, a real Packages.xz and Release.  Only InRelease's signature is taken as checked: a test
cannot sign as Debian's archive keys (make test's own fetch checks the real one)."""
from __future__ import annotations

import hashlib
import lzma
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import prometheus_bin as pb

VERSION = re.compile(r"^(?:prometheus|promtool), version ((\d+)\.(\d+)\.\S*)", flags=re.M)


def test_the_tests_run_the_prometheus_series_compose_pins() -> None:
    image = yaml.safe_load(pb.COMPOSE.read_text())["services"]["prometheus"]["image"]
    assert re.fullmatch(rf"prom/prometheus:v{re.escape(pb.pinned_series())}\.\d+", image), image
    if (found := pb.binaries()) is None:
        pytest.skip(pb.skip_reason())
    for binary in found:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
        version = VERSION.search(out.stdout + out.stderr)
        assert version, out.stdout + out.stderr
        assert f"{version[2]}.{version[3]}" == pb.pinned_series(), (
            f"{binary} is version {version[1]}, compose pins {image}: the tests run the wrong Prometheus")


@pytest.mark.parametrize("version, expected", [
    ("3.5.3+ds1-6", True), ("3.5.10-1", True), ("1:3.5.0-1", True), ("3.5.0~rc1-1", True),
    ("3.50.1+ds-1", False), ("3.6.0+ds1-1", False), ("2.53.3+ds1-1", False), ("13.5.0-1", False),
])
def test_a_debian_version_is_of_the_series_by_its_upstream_major_minor(version: str, expected: bool) -> None:
    assert pb.in_series(version, "3.5") is expected


def test_the_index_hash_is_read_from_the_sha256_section() -> None:
    release = ("Suite: unstable\nMD5Sum:\n 0123 10 main/binary-amd64/Packages.xz\n"
               "SHA256:\n abcd 10 main/binary-amd64/Packages\n ef01 10 main/binary-amd64/Packages.xz\n")
    assert pb.listed_sha256(release, "main/binary-amd64/Packages.xz") == "ef01"
    with pytest.raises(pb.Unavailable, match="lists no SHA256 for main/binary-amd64/Packages.gz"):
        pb.listed_sha256(release, "main/binary-amd64/Packages.gz")


def fake_deb(work: Path, package: str, version: str) -> Path:
    """A real .deb with one executable, usr/bin/<package>, that prints a version line."""
    root = work / f"{package}-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(f"Package: {package}\nVersion: {version}\nArchitecture: amd64\n"
                                             "Maintainer: tests <t@example.org>\nDescription: a test package\n")
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / package).write_text(f"#!/bin/sh\necho '{package}, version {version}'\n")
    (root / "usr" / "bin" / package).chmod(0o755)
    deb = work / "mirror" / "pool" / "main" / "p" / "prometheus" / f"{package}_{version}_amd64.deb"
    deb.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-Zgzip", "--root-owner-group", "-b", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


def stanza(deb: Path, package: str, version: str) -> str:
    return (f"Package: {package}\nVersion: {version}\nDescription: x\n continued\n"
            f"Filename: pool/main/p/prometheus/{deb.name}\nSHA256: {hashlib.sha256(deb.read_bytes()).hexdigest()}\n")


def suite(work: Path, name: str, packages: list[tuple[str, str]]) -> str:
    """A suite of the fake mirror with ``packages``; its (signed) Release text."""
    paragraphs = [stanza(fake_deb(work, p, v), p, v) for p, v in packages]
    index = lzma.compress(("Package: other\nVersion: 1\n\n" + "\n".join(paragraphs)).encode())
    (work / "mirror" / "dists" / name / pb.INDEX).parent.mkdir(parents=True)
    (work / "mirror" / "dists" / name / pb.INDEX).write_bytes(index)
    return f"Suite: {name}\nSHA256:\n {hashlib.sha256(index).hexdigest()} {len(index)} {pb.INDEX}\n"


@pytest.fixture
def archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """sid as a directory: prometheus 3.5.9 and promtool 3.5.9, a 3.5.10 prometheus without its
    promtool and a 3.6 pair; testing with a 3.4 pair; the module's mirror and cache pointed there."""
    if not shutil.which("dpkg-deb"):
        pytest.skip("needs dpkg-deb (Debian's dpkg)")
    releases = {"sid": suite(tmp_path, "sid", [
        ("prometheus", "3.5.9+ds1-1"), ("promtool", "3.5.9+ds1-1"), ("prometheus", "3.5.10+ds1-1"),
        ("prometheus", "3.6.0+ds1-1"), ("promtool", "3.6.0+ds1-1")]),
        "testing": suite(tmp_path, "testing", [("prometheus", "3.4.2+ds1-1"), ("promtool", "3.4.2+ds1-1")])}
    monkeypatch.setattr(pb, "signed_release", lambda tmp, name: releases[name])
    monkeypatch.setattr(pb, "MIRROR", (tmp_path / "mirror").as_uri())
    monkeypatch.setattr(pb, "CACHE", tmp_path / "cache")
    monkeypatch.delenv("PROMETHEUS", raising=False)
    monkeypatch.delenv("PROMTOOL", raising=False)
    return tmp_path


def test_a_fetch_unpacks_the_newest_complete_pair_of_the_series_and_reruns_offline(
        archive: Path, capsys: pytest.CaptureFixture) -> None:
    assert pb.binaries() is None
    assert pb.main([]) == 0
    version, bindir = capsys.readouterr().out.split()
    assert version == "3.5.9+ds1-1" and Path(bindir) == archive / "cache" / version / "usr" / "bin"
    prometheus, promtool = pb.binaries()
    assert subprocess.run([promtool], capture_output=True, text=True).stdout == "promtool, version 3.5.9+ds1-1\n"
    assert "prometheus_3.5.9+ds1-1_amd64.deb" in (archive / "cache" / version / "SOURCES").read_text()
    shutil.rmtree(archive / "mirror" / "pool")  # --refresh reads the index: the same version is not fetched again
    assert pb.main(["--refresh"]) == 0 and capsys.readouterr().out.split() == [version, bindir]
    shutil.rmtree(archive / "mirror")  # offline: the unpacked packages are enough
    assert pb.main([]) == 0 and capsys.readouterr().out.split() == [version, bindir]
    assert sorted(p.name for p in (archive / "cache").iterdir()) == [version, "current"]  # no leftovers


def test_a_deb_that_does_not_match_the_index_is_refused(archive: Path, capsys: pytest.CaptureFixture) -> None:
    deb = next((archive / "mirror" / "pool").rglob("promtool_3.5.9+ds1-1_amd64.deb"))
    deb.write_bytes(deb.read_bytes() + b"\0")
    assert pb.main([]) == 1
    (line,) = capsys.readouterr().err.splitlines()[1:]
    assert line.startswith("prometheus_bin: file://") and line.endswith(
        f"{deb.name} does not match the SHA256 in sid's Packages (try again)")
    assert pb.binaries() is None and [p.name for p in (archive / "cache").iterdir()] == []


def test_a_series_sid_has_moved_past_comes_from_testing(archive: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(pb, "pinned_series", lambda: "3.4")
    assert pb.main([]) == 0
    version, bindir = capsys.readouterr().out.split()
    assert version == "3.4.2+ds1-1" and pb.binaries() == (f"{bindir}/prometheus", f"{bindir}/promtool")
    assert subprocess.run([f"{bindir}/promtool"], capture_output=True, text=True).stdout == (
        "promtool, version 3.4.2+ds1-1\n")


def test_no_suite_with_the_series_is_one_line_naming_what_each_has(archive: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(pb, "pinned_series", lambda: "3.7")
    assert pb.main(["--optional"]) == 0  # make test: the tests that need Prometheus skip
    (line,) = capsys.readouterr().err.splitlines()[1:]
    assert line == ("prometheus_bin: Debian sid and testing have no prometheus and promtool 3.7.x any more (sid has "
                    "3.5.10+ds1-1, 3.5.9+ds1-1, 3.6.0+ds1-1; testing has 3.4.2+ds1-1): move docker/compose.yaml's "
                    "prom/prometheus pin to a series they have; the tests that need Prometheus will skip")
    assert pb.main([]) == 1  # .ci/run: it must be there
