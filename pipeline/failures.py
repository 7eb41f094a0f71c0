"""A DALI loader failure as one line that names the shard and what to do (for the tools; the
service's fuller diagnosis, which also names the damaged samples, is ``service.data_errors``).

DALI stops the whole pipeline on the first sample it cannot read or decode, with a message of
many lines (the operator's definition, "Current pipeline object is no longer valid").  A JPEG the
decoder started on and could not finish is named by its source info, ``Failed to decode sample
#1 : <tar>:<offset>:<key>.jpg``; bytes nvImageCodec refuses outright are not (``nvImageCodec
failure: '#4'``): then the shards are checked against the manifest (size, index, sha256; only on
this failure path) and the changed one is named.
"""
from __future__ import annotations

import re

from shards.manifest import Manifest, Shard, remake, shard_problem

_NOISE = ("Current pipeline object is no longer valid", "C++ context", "Critical error in pipeline")
_SAMPLE = re.compile(r"^Failed to decode sample #\d+ : (.+):(\d+):([^:\n]+)\.jpg$", re.MULTILINE)


def changed_shards(manifest: Manifest, split: str) -> list[tuple[Shard, str]]:
    """Shards of ``split`` that differ from the manifest, with what is wrong with each."""
    return [(shard, problem) for shard in manifest.splits[split].shards if (problem := shard_problem(shard))]


def dali_reason(text: str) -> str:
    """The informative line of a DALI error (what follows "encountered:"), else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    useful = [ln for ln in lines if not ln.startswith(_NOISE)]
    return (useful or lines or [text])[0]


def loader_failure(exc: BaseException, manifest: Manifest, split: str) -> str:
    """One line for a failure of the ``split`` loader over ``manifest``'s shards: the shard (and
    the sample when DALI names it), why, and what to do."""
    text, shards = str(exc), manifest.splits[split].shards
    hint = f"re-create the shards ({remake(manifest.root)}) or restore them from a copy"
    if found := _SAMPLE.search(text):
        tar, offset, key = found.groups()
        return f"{split} shard {tar}: sample {key} (at byte {offset}) does not decode as a JPEG; {hint}"
    reason = dali_reason(text)
    if named := [s.tar for s in shards if str(s.tar) in text]:
        return f"{split} shard {named[0]} cannot be read ({reason}); {hint}"
    if changed := changed_shards(manifest, split):
        (shard, problem), more = changed[0], f" (and {len(changed) - 1} more shard(s))" if len(changed) > 1 else ""
        return f"{split} shard {shard.tar}: {problem}{more}; the loader failed with: {reason}; {hint}"
    return (f"the {split} loader failed ({reason}) although every {split} shard in {manifest.root} matches its "
            "manifest checksum: the data is as written; the failure is elsewhere (memory, DALI, the decoder)")
