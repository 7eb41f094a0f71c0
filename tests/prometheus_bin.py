"""Prometheus and promtool for the tests, of the major.minor series docker/compose.yaml pins.

The stack runs the prom/prometheus:vX.Y.Z image, but the test machines reach no image registry, and
Debian stable packages Prometheus 2.x, whose PromQL and scraping differ from 3.x's (left-open range
selectors, normalised le/quantile label values, regex dot matching newlines, no silent fallback
for a scrape without a valid Content-Type).  Debian sid packages 3.x, linked against libc 2.34 or
newer, which runs on bookworm: this module fetches sid's ``prometheus`` and ``promtool`` packages
of the pinned series, or testing's when sid has moved past it (testing takes sid's packages days
to weeks later, so it keeps a series for a while after sid has a newer one), and unpacks them with
``dpkg-deb -x`` into .cache/prometheus/<version>/ (nothing is installed).  make test, make
test-fast and .ci/run run it before the tests, make test-docker builds its Prometheus stand-in
image from the same binary, and the tests find the binaries through ``binaries()``.

What is downloaded is checked as apt checks it: the suite's InRelease against Debian's archive
keyring (gpgv), the SHA256 of Packages.xz against InRelease, each .deb's SHA256 against Packages.
The index is read rather than file names or hashes pinned here: sid deletes a package's file as
soon as a newer upload replaces it, so a pinned name would stop resolving within weeks, while the
signed index always names what is there.  The unpacked tree is kept (not the .debs: the binaries
are all the tests need), so later runs are offline; ``--refresh`` reads the index again.

    python3 -m tests.prometheus_bin             # stdout: "<debian version> <bin dir>"
    python3 -m tests.prometheus_bin --optional  # a failure is one line and exit 0 (the tests skip)
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "compose.yaml"
CACHE = ROOT / ".cache" / "prometheus"
MIRROR = "https://deb.debian.org/debian"
SUITES = ("sid", "testing")  # the first that has the pinned series
INDEX = "main/binary-amd64/Packages.xz"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
PACKAGES = ("prometheus", "promtool")
FETCH = "python3 -m tests.prometheus_bin"


class Unavailable(Exception):
    """Why the binaries cannot be had: one line that says what to do."""


class NotInSuite(Unavailable):
    """A suite has no complete pair of the series; ``has`` is what it has."""

    def __init__(self, suite: str, series: str, has: str) -> None:
        super().__init__(f"Debian {suite} has no prometheus and promtool {series}.x (it has {has})")
        self.suite, self.has = suite, has


def pinned_series(compose: Path = COMPOSE) -> str:
    """'3.5' for compose's ``image: prom/prometheus:v3.5.0``: the series the tests must run."""
    found = re.search(r"^\s*image:\s*prom/prometheus:v(\d+)\.(\d+)\.", compose.read_text(), flags=re.M)
    if not found:
        raise Unavailable(f"no prom/prometheus:vX.Y.Z image in {compose}")
    return f"{found[1]}.{found[2]}"


def in_series(version: str, series: str) -> bool:
    """A Debian version of upstream series X.Y (3.5.3+ds1-6 is 3.5; 3.50.1-1 is not)."""
    return re.fullmatch(rf"(\d+:)?{re.escape(series)}\.\d+([+~-].*)?", version) is not None


def installed(series: str) -> tuple[str, Path] | None:
    """(Debian version, bin dir) of the unpacked packages when they are of ``series``."""
    try:
        version = os.readlink(CACHE / "current")
    except OSError:
        return None
    bindir = CACHE / version / "usr" / "bin"
    if in_series(version, series) and all((bindir / name).is_file() for name in PACKAGES):
        return version, bindir
    return None


def binaries() -> tuple[str, str] | None:
    """(prometheus, promtool) for the tests: $PROMETHEUS / $PROMTOOL where set (a build of one's
    own; tests/test_prometheus_bin.py checks its series), else the unpacked packages; None when
    either is missing (``skip_reason()`` says how to get them)."""
    unpacked = installed(pinned_series())
    found = []
    for name in PACKAGES:
        path = os.environ.get(name.upper()) or (str(unpacked[1] / name) if unpacked else "")
        if not (path and os.access(path, os.X_OK)):
            return None
        found.append(path)
    return found[0], found[1]


def skip_reason() -> str:
    return (f"needs Prometheus {pinned_series()}.x and promtool (the series docker/compose.yaml pins): "
            f"`{FETCH}` fetches them from Debian {' or '.join(SUITES)} into .cache/prometheus "
            "(make test and .ci/run run it)")


def download(url: str, dest: Path) -> str:
    """Write ``url`` to ``dest``; its SHA256."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, dest.open("wb") as f:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
    except OSError as e:
        raise Unavailable(f"cannot download {url}: {e}") from None
    return digest.hexdigest()


def signed_release(tmp: Path, suite: str) -> str:
    """``suite``'s InRelease: only the text Debian's archive keys signed."""
    for tool, package in (("gpgv", "gpgv"), ("dpkg-deb", "dpkg")):
        if not shutil.which(tool):
            raise Unavailable(f"needs {tool} (apt-get install {package})")
    if not KEYRING.is_file():
        raise Unavailable(f"needs Debian's archive keys in {KEYRING} (apt-get install debian-archive-keyring)")
    download(f"{MIRROR}/dists/{suite}/InRelease", tmp / "InRelease")
    check = subprocess.run(["gpgv", "--status-fd", "1", "--keyring", str(KEYRING), "--output", str(tmp / "Release"),
                            str(tmp / "InRelease")], capture_output=True, text=True)
    # apt's rule: one good signature by a key of the keyring and no bad one.  sid is signed by the
    # keys of several releases; one newer than this machine's keyring only lacks its key (exit 2).
    if "[GNUPG:] VALIDSIG " not in check.stdout or "[GNUPG:] BADSIG " in check.stdout:
        why = check.stderr.strip().splitlines()[-1:] or [f"exit {check.returncode}"]
        raise Unavailable(f"{suite}'s InRelease is not signed by a key in {KEYRING} ({why[0]})")
    # Valid-Until is not enforced (apt enforces it against replayed indexes, which matters for an
    # installed system's security updates): an older index, from a mirror snapshot or a proxy
    # cache, is still one Debian signed, and only names an older signed build.
    return (tmp / "Release").read_text()


def listed_sha256(release: str, path: str, suite: str = "the suite") -> str:
    """The SHA256 a Release file lists for ``path`` (its SHA256 section, not MD5Sum's)."""
    for line in release.partition("\nSHA256:\n")[2].splitlines():
        if not line.startswith(" "):
            break
        digest, _size, name = line.split()
        if name == path:
            return digest
    raise Unavailable(f"{suite}'s InRelease lists no SHA256 for {path}")


def stanzas(index: str, names: tuple[str, ...]):
    """The fields of each paragraph of a Packages index for the packages ``names``."""
    heads = tuple(f"Package: {n}\n" for n in names)
    for block in index.split("\n\n"):
        if block.lstrip("\n").startswith(heads):
            yield dict(re.findall(r"^([\w-]+): ?(.*)$", block, flags=re.M))


def dpkg_compare(a: str, b: str) -> int:
    if a == b:
        return 0
    lower = subprocess.run(["dpkg", "--compare-versions", a, "lt", b]).returncode == 0
    return -1 if lower else 1


def choose(index: str, series: str, suite: str) -> dict[str, dict[str, str]]:
    """The Packages fields of prometheus and promtool at the newest version of ``series`` both have."""
    versions: dict[str, dict[str, dict[str, str]]] = {name: {} for name in PACKAGES}
    for fields in stanzas(index, PACKAGES):
        versions[fields["Package"]][fields["Version"]] = fields
    common = [v for v in versions["prometheus"] if in_series(v, series) and v in versions["promtool"]]
    if not common:
        raise NotInSuite(suite, series, ", ".join(sorted(versions["prometheus"])) or "no prometheus")
    newest = max(common, key=functools.cmp_to_key(dpkg_compare))
    return {name: versions[name][newest] for name in PACKAGES}


def fetch(series: str) -> tuple[str, Path]:
    """The packages of ``series`` from the first of ``SUITES`` that has them (see :func:`fetch_from`)."""
    missing = []
    for suite in SUITES:
        try:
            return fetch_from(suite, series)
        except NotInSuite as e:
            missing.append(e)
    raise Unavailable(f"Debian {' and '.join(SUITES)} have no prometheus and promtool {series}.x any more ("
                      + "; ".join(f"{e.suite} has {e.has}" for e in missing)
                      + "): move docker/compose.yaml's prom/prometheus pin to a series they have")


def fetch_from(suite: str, series: str) -> tuple[str, Path]:
    """Download, check and unpack ``suite``'s packages of ``series``; make them the current ones."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".fetch-") as name:
        tmp = Path(name)
        release = signed_release(tmp, suite)
        if download(f"{MIRROR}/dists/{suite}/{INDEX}", tmp / "Packages.xz") != listed_sha256(release, INDEX, suite):
            raise Unavailable(f"{INDEX} does not match {suite}'s InRelease (a mirror mid-update? try again)")
        chosen = choose(lzma.decompress((tmp / "Packages.xz").read_bytes()).decode(), series, suite)
        version = chosen["prometheus"]["Version"]
        if (have := installed(series)) and have[0] == version:
            return have  # --refresh, and the suite has nothing newer
        tree, sources = tmp / "tree", []
        for fields in chosen.values():
            url, deb = f"{MIRROR}/{fields['Filename']}", tmp / Path(fields["Filename"]).name
            if download(url, deb) != fields["SHA256"]:
                raise Unavailable(f"{url} does not match the SHA256 in {suite}'s Packages (try again)")
            unpacked = subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], capture_output=True, text=True)
            if unpacked.returncode != 0:
                raise Unavailable(f"dpkg-deb -x {deb.name} failed: {unpacked.stderr.strip()}")
            sources.append(f"{fields['SHA256']}  {url}\n")
        (tree / "SOURCES").write_text("".join(sources))  # what was checked, for the curious
        install(tree, version)
    return version, CACHE / version / "usr" / "bin"


def install(tree: Path, version: str) -> None:
    """Move a checked tree into place and point ``current`` at it; older versions go."""
    final = CACHE / version
    if not final.exists():  # else a concurrent fetch installed the same packages first
        tree.rename(final)
    link = CACHE / f".current-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(version)
    os.replace(link, CACHE / "current")
    for old in CACHE.iterdir():
        if old.is_dir() and not old.is_symlink() and old.name != version and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=FETCH, description=__doc__.split("\n\n")[0])
    parser.add_argument("--optional", action="store_true",
                        help="on failure, print one line and exit 0: the tests that need Prometheus skip")
    parser.add_argument("--refresh", action="store_true", help="read the suites' indexes even when the series is here")
    args = parser.parse_args(argv)
    series = ""
    try:
        series = pinned_series()
        found = None if args.refresh else installed(series)
        if found is None:
            print(f"prometheus_bin: fetching Debian's prometheus and promtool {series}.x (about 36 MB, from "
                  f"{' or '.join(SUITES)}) into {CACHE}", file=sys.stderr)
            found = fetch(series)
    except Unavailable as e:
        kept = installed(series) if series else None  # a --refresh that failed leaves it in place
        then = f"; keeping {kept[0]}" if kept else "; the tests that need Prometheus will skip" if args.optional else ""
        print(f"prometheus_bin: {e}{then}", file=sys.stderr)
        return 0 if args.optional else 1
    print(found[0], found[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
