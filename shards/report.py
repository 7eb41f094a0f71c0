"""What the sharder tells the person running it at the end: a few lines for the terminal.

File names are bytes on Linux, and ImageNet copies made on other systems can hold names that
are not UTF-8; Python carries those as lone surrogates, which a UTF-8 terminal (``strict``
errors, the default outside the C locale) refuses to print.  Every line goes through
``printable`` so such a name shows as ``\\xfe`` instead of ending a finished run in a traceback.
"""
from __future__ import annotations

import json
from pathlib import Path

from shards.tarwriter import atomic_write_text


class NoTrainingImages(RuntimeError):
    """Nothing usable in the training split: no statistics, nothing to train on."""


def check_trainable(found: int, written: int | None, src: Path, out: Path, skipped: list[dict] = ()) -> None:
    """Stop with one line when the training split has no image (``found`` at the scan) or none
    was usable (``written``, after writing).  Why: with every training image skipped (a lenient
    ``max_skipped_fraction``) or only empty class folders, the run went on to the statistics and
    ended in a ValueError traceback ("no training shards to compute statistics from")."""
    if found == 0:
        raise NoTrainingImages(f"no training image found under {src}: its training class folders are empty; "
                               "check that the images were extracted into them, then re-run")
    if written == 0:
        report = write_skipped(out, skipped)
        raise NoTrainingImages(f"none of the {found} training images could be used: every one was skipped, each "
                               f"with its reason in {report}; fix them, then re-run")


def write_skipped(out: Path, skipped: list[dict]) -> Path:
    """``out/skipped.json``: every skipped input and its reason, for a run that stops on them."""
    report = out / "skipped.json"
    atomic_write_text(report, json.dumps(list(skipped), indent=1) + "\n")
    return report


def printable(text: str) -> str:
    """``text`` with any undecodable file-name byte shown as ``\\xNN`` (valid UTF-8 in, unchanged out)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _empty_classes(record: dict) -> list[str]:
    """A warning for the classes without one training image.  Why: their class folder is empty
    (an extraction that failed, a copy cut short) or every image in it was skipped; the class
    keeps its index, so the run succeeds, and the model gets an output it can never learn, which
    nothing said before."""
    counts = record["splits"].get("train", {}).get("class_counts", [])
    empty = [c["wnid"] for c, n in zip(record["classes"], counts) if n == 0]
    if not empty:
        return []
    shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
    return [f"  warning: {len(empty)} of {len(counts)} classes have no training image: {shown} (an empty class "
            "folder, or every image in it skipped: check the source, then re-run)"]


def _oversize(record: dict) -> list[str]:
    """A warning for each image that alone needs a tar past ``shard_bytes`` (a tar is not cut
    inside an image: it is alone in its tar).  Why: such a tar was written past the limit without
    a word, for a reader sizing its buffers or a store its objects by the limit to find out later."""
    limit, oversize = record["parameters"].get("shard_bytes"), record.get("oversize", [])
    lines = [f"  warning: {o['path']} needs a tar of {o['bytes']} bytes, past --shard_bytes {limit}: it is alone in "
             f"{o['split']}/{o['tar']} (a tar is not cut inside an image)" for o in oversize[:20]]
    if len(oversize) > 20:
        lines.append(f"  ... and {len(oversize) - 20} more tars past --shard_bytes (see 'oversize' in manifest.json)")
    return lines


def summary(record: dict, seconds: float) -> str:
    """A few lines for the terminal."""
    lines = [f"shards: {record['inputs']} inputs -> {record['written']} written "
             f"({len(record['converted'])} converted), {len(record['skipped'])} skipped, "
             f"{len(record['ignored'])} hidden files ignored, in {seconds:.1f} s"]
    for name, split in record["splits"].items():
        lines.append(f"  {name}: {split['samples']} samples in {len(split['shards'])} shards")
    lines += _empty_classes(record) + _oversize(record)
    for item in record["skipped"][:20]:
        lines.append(f"  skipped {item['path']}: {item['reason']}")
    if len(record["skipped"]) > 20:
        lines.append(f"  ... and {len(record['skipped']) - 20} more (see manifest.json)")
    return printable("\n".join(lines))
