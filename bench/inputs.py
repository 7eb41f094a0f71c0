"""What a benchmark checks before it times anything: the shard directory it was given, the
device, and where its record goes.

A missing directory, or one that holds no shards (``SHARDS=`` pointing at the images, say), is a
setting to correct, not a bug: one line naming it and the fix (``shards.manifest``'s own message),
exit 1 as the service's data errors, and before the timed work, so that a wrong setting does not
cost minutes of measurement first (``bench_service`` used to find out at its end).  The same for
a ``--report`` that cannot be written (the record is written last, so it was found out last) and
a ``--device`` that is not here (torch's traceback, at the first tensor put there).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common.config_values import file_in_the_way, path_arg
from shards.manifest import Manifest, ManifestError, load


def shards_or_exit(prog: str, root: Path) -> Manifest:
    """``root``'s checked manifest (every split), or the one line ``prog: <what is wrong and the
    fix>`` on stderr and exit 1."""
    try:
        return load(root)
    except ManifestError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def source_or_exit(prog: str, root: Path) -> None:
    """``root`` holds a dataset ``make shards`` reads (``shards.layouts.scan``, the sharder's own
    check), or its message, ``prog: `` first, on stderr and exit 1."""
    from shards.layouts import LayoutError, scan

    try:
        scan(root)
    except LayoutError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def report_arg(value: str) -> Path:
    """An ``argparse`` ``type=`` for ``--report``: refused at once where the record (and the chart
    next to it) could not be written at the end: the path a directory, a parent that is a file, a
    parent that cannot be made or written in.  Makes the missing parents, as the end would."""
    path = path_arg(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {path}: it is a directory (name the record's file, "
                                         f"e.g. {path / 'record.json'})")
    if (blocker := file_in_the_way(path.parent)) is not None:
        raise argparse.ArgumentTypeError(f"cannot write {path}: {blocker} is not a directory")
    try:  # what the end will do, tried now (permission bits alone do not tell root, or /proc, apart)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def device_arg(value: str) -> str:
    """An ``argparse`` ``type=`` for ``--device``: cpu, or a CUDA device this process sees; else one
    line with the reason (``service.build.cuda_problem``, as predict's ``--device`` says it)."""
    import torch

    from service.build import cuda_problem
    from service.model_settings import device_name_ok

    if not device_name_ok(value, auto=False):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {value!r} (use --device cpu if unsure)")
    if problem := cuda_problem(torch.device(value)):
        raise argparse.ArgumentTypeError(f"{value}: {problem}; use --device cpu")
    return value
