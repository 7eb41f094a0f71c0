"""What a benchmark checks before it times anything: the shard directory it was given.

A missing directory, or one that holds no shards (``SHARDS=`` pointing at the images, say), is a
setting to correct, not a bug: one line naming it and the fix (``shards.manifest``'s own message),
exit 1 as the service's data errors, and before the timed work, so that a wrong setting does not
cost minutes of measurement first (``bench_service`` used to find out at its end).
"""
from __future__ import annotations

import sys
from pathlib import Path

from shards.manifest import Manifest, ManifestError, load


def shards_or_exit(prog: str, root: Path) -> Manifest:
    """``root``'s checked manifest (every split), or the one line ``prog: <what is wrong and the
    fix>`` on stderr and exit 1."""
    try:
        return load(root)
    except ManifestError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
