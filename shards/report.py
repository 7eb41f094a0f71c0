"""What the sharder tells the person running it at the end: a few lines for the terminal.

File names are bytes on Linux, and ImageNet copies made on other systems can hold names that
are not UTF-8; Python carries those as lone surrogates, which a UTF-8 terminal (``strict``
errors, the default outside the C locale) refuses to print.  Every line goes through
``printable`` so such a name shows as ``\\xfe`` instead of ending a finished run in a traceback.
"""
from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with any undecodable file-name byte shown as ``\\xNN`` (valid UTF-8 in, unchanged out)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def path_bytes(path: str) -> bytes:
    """A path as the bytes the file system holds (what a fingerprint must digest)."""
    return path.encode("utf-8", "surrogateescape")


def summary(record: dict, seconds: float) -> str:
    """A few lines for the terminal."""
    lines = [f"shards: {record['inputs']} inputs -> {record['written']} written "
             f"({len(record['converted'])} converted), {len(record['skipped'])} skipped, "
             f"{len(record['ignored'])} hidden files ignored, in {seconds:.1f} s"]
    for name, split in record["splits"].items():
        lines.append(f"  {name}: {split['samples']} samples in {len(split['shards'])} shards")
    for item in record["skipped"][:20]:
        lines.append(f"  skipped {item['path']}: {item['reason']}")
    if len(record["skipped"]) > 20:
        lines.append(f"  ... and {len(record['skipped']) - 20} more (see manifest.json)")
    return printable("\n".join(lines))
