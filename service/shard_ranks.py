"""The shard check at start with several ranks (``service.shard_check``): which rank checks which
copy of the shards, and how the ranks' verdicts become one decision that every rank follows.

Several ranks: rank 0 checks and writes the file, every rank follows its verdict at start (one
gather); a mismatch found later by the background pass stops rank 0 and torchrun the others.
Ranks whose shards are other files than rank 0's (another node's copy: ``--shards`` may differ
per rank) have the first of them reading that copy check it as rank 0 does its own, in
``shard-checks.rank<r>.json`` (once per copy, not once per GPU), and every rank follows every
such verdict: a damaged byte in that copy went unseen (``data.verify before`` included) and
those ranks trained on garbled pixels.

Its own module: these are the rules between ranks, the same whichever way a rank's own check
(hashing, its memory, its threads) goes.
"""
from __future__ import annotations

import socket

from service.errors import DataError, StoppedAtStart
from service.shard_findings import Finding
from shards.manifest import Manifest, remake


def copy_of(manifest: Manifest) -> tuple[str, int, int]:
    """Which files a rank's shards are: the same on two ranks when they read the same directory."""
    st = (manifest.root / "manifest.json").stat()
    return socket.gethostname(), st.st_dev, st.st_ino


def merged(verdicts: list[list[Finding] | str | None]) -> list[Finding]:
    """Every checking rank's findings (each rank's verdict in rank order, ``None`` for a rank that
    did not check), rank 0's first, a shard once; ``StoppedAtStart`` when one rank's check was
    stopped (its verdict is the line saying so)."""
    if stopped := next((v for v in verdicts if isinstance(v, str)), None):
        raise StoppedAtStart(stopped)
    findings: list[Finding] = []
    for f in (f for v in verdicts if v for f in v):
        if all(f.shard.tar.name != g.shard.tar.name for g in findings):
            findings.append(f)
    return findings


def refuse_empty(manifest: Manifest, excluded: frozenset[str]) -> None:
    """A ``DataError`` when skipping left a split without shards: nothing to train or evaluate
    on (an empty val reader was a ValueError traceback, an empty train one blamed the batch size)."""
    for split, s in manifest.splits.items():
        if s.shards and all(shard.tar.name in excluded for shard in s.shards):
            raise DataError(f"every {split} shard ({len(s.shards)} of {len(s.shards)}) differs from the manifest "
                            f"of {manifest.root}, so data.on_corrupt skip left nothing to "
                            f"{'train' if split == 'train' else 'evaluate'} on: restore the shards from a copy or "
                            f"re-create them ({remake(manifest.root)})")
