"""What the shard check says about a shard that differs from the manifest (``service.shard_check``
finds them): the shard and its damaged samples, what may have used it, and what to do.

Why a module of its own: these lines are the user's whole view of a damaged shard (the run stops
on them, or leaves the shard out), and their wording is judged on its own; the check's threads
and memory are another concern.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from service.data_errors import damaged_samples
from shards.manifest import CORRUPT, Shard, fix_in_text, remake


@dataclass(frozen=True)
class Finding:
    """A shard that differs from the manifest, described for a person."""

    split: str
    shard: Shard
    text: str  # "<split> shard <tar>: <problem>; <samples>"
    fixed_by_text: bool = False  # the problem says its fix (rewrite the DALI index, read access), not the shards


def describe(split: str, shard: Shard, problem: str, num_classes: int) -> Finding:
    """The finding for ``shard``'s ``problem``; a corrupt one names the samples that fail to decode."""
    samples = f"; {damaged_samples(shard.tar, num_classes)}" if problem == CORRUPT else ""
    return Finding(split, shard, f"{split} shard {shard.tar}: {problem}{samples}", fix_in_text(problem))


def consumed(finding: Finding, step: int, start_step: int, entry: dict) -> str:
    """What may have used the shard, as exactly as the loop knows it: this start began at
    ``start_step`` and is at ``step``; ``entry`` is the shard's memory (when it was last intact)."""
    if finding.split == "val":
        now = "the evaluations of this start may have read it (validation data: no step trained on it)"
    elif step > start_step:
        now = (f"by then training had run {step - start_step} step(s) of this start (steps {start_step + 1}..{step}), "
               f"so samples of it may have been trained on, and checkpoints after step {start_step} include them")
    else:
        now = "no step of this start used it"
    if start_step == 0:
        return now
    if entry.get("ok_at"):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["ok_at"]))
        return f"{now}; it was intact when last checked ({when}), so earlier starts since then may have used it too"
    return now + f"; it had never been checked, so earlier starts (steps 1..{start_step}) may have used it too"


def hint(finding: Finding) -> str:
    """What to do about it, for the shards that hold the finding's shard (``<root>/<split>/<tar>``):
    a finding of another rank's copy (each node its own --shards) is said by every rank, and rank
    0's own root in it told the user to re-create rank 0's intact shards."""
    skip = "leave bad shards out: --data.on_corrupt skip --data.verify before"
    if finding.fixed_by_text:
        return f"or {skip}"
    return f"restore the shard from a copy or re-create the shards ({remake(finding.shard.tar.parent.parent)}); or {skip}"


def size_text(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def done_line(count: int, bad: int, total: int, seconds: float) -> str:
    """The check's summary; its rate in MB/s below 0.1 GB/s (the sample's 20 MB read '0.00 GB/s')."""
    rate = total / max(seconds, 1e-9)
    speed = f"{rate / 1e9:.2f} GB/s" if rate >= 1e8 else f"{rate / 1e6:.1f} MB/s"
    return (f"shards: {count} checked against the manifest, {f'{bad} bad' if bad else 'all intact'} "
            f"({size_text(total)} in {seconds:.2g} s, {speed})")
