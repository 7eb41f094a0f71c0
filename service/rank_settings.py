"""Do the ranks of one torchrun job run the same settings?  Checked once they have joined, before
anything is deleted (``--fresh``), resumed or trained: every rank gathers every rank's settings
and, when any differs from rank 0's, every rank refuses (exit 2), rank 0's line naming each
rank's differing keys with rank 0's values.

Why: nothing else compares them, and ranks started with other flags (a wrapper that adds some on
one rank, a node with another config file) failed in ways that named nothing.  Another
``epochs`` or ``fresh`` left every rank blocked in a collective until gloo's 30-minute timeout
(and rank 0's ``--fresh`` had deleted the old run first); another batch size or checkpoint
interval aborted rank 0 inside gloo ("collective mismatch"); another learning rate or seed ended
0 with replicas that differ, or samples read twice (``pipeline.graph`` splits each epoch's shard
order by one seed); other data trained on a mix while the checkpoint named rank 0's.

What may differ per rank, by design (``PER_RANK``): where the shards and the run directory are
mounted on each node (the data is compared by its manifest's fingerprint instead, as a resumed
checkpoint's is: ``service.state.data_fingerprint``), the HTTP endpoint (rank r serves on port +
its local rank, each node on its own address), and the device, which ``auto`` resolves to each
rank's own GPU: of ``device`` and ``model.devices`` only the kind (cpu, cuda) is compared.  And
what only sets how a rank uses its own host (DALI's CPU threads, their prefetch depth and cores,
how the host waits for its GPU, its /healthz stall limit): nodes may have other core counts, and
none of these changes a collective or a number the model computes.  Everything else must be
equal, ``fresh`` included.
"""
from __future__ import annotations

from typing import Any

from common.config import to_dict
from service.config import TrainConfig
from service.dist import Ranks
from service.errors import EXIT_CONFIG, ServiceError
from service.state import flatten

PER_RANK = ("shards", "out", "http.host", "http.port", "http.stall_seconds", "device", "model.devices",
            "loader.threads", "loader.prefetch", "loader.affinity", "cuda_sync")
HINT = "start every rank with the same command line and config"
SHOWN = 6  # differing keys named per rank; the rest are counted


def compared(cfg: TrainConfig, fingerprint: str) -> dict[str, Any]:
    """What of this rank's resolved ``cfg`` must equal every other rank's, plus the shards' path
    (``_shards``, for the message only) and their data's fingerprint (``data``)."""
    flat = {k: v for k, v in flatten(to_dict(cfg)).items() if k not in PER_RANK}
    kinds = {"device": cfg.device.partition(":")[0],
             "model.devices": ",".join(d.partition(":")[0] for d in cfg.model.devices)}
    return {**flat, **kinds, "data": fingerprint, "_shards": str(cfg.shards)}


def described(everyone: list[dict[str, Any]]) -> str | None:
    """Each rank whose settings differ from rank 0's, with the keys and both values; None when
    all agree."""
    first, parts = everyone[0], []
    for rank, mine in enumerate(everyone[1:], start=1):
        keys = _differing(first, mine)
        if not keys:
            continue
        said = [_describe(k, mine, first) for k in keys[:SHOWN]]
        more = f" (and {len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
        parts.append(f"rank {rank}'s settings differ from rank 0's: {', '.join(said)}{more}")
    return "; ".join(parts) or None


def differing_keys(everyone: list[dict[str, Any]]) -> list[str]:
    """Every key some rank has otherwise than rank 0, sorted."""
    return sorted({k for mine in everyone[1:] for k in _differing(everyone[0], mine)})


def _differing(first: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """The keys ``mine`` has otherwise than ``first`` (rank 0's), sorted; the shards' path is for
    the message only."""
    return [k for k in sorted(set(first) | set(mine)) if k != "_shards" and first.get(k) != mine.get(k)]


def check_same_settings(cfg: TrainConfig, fingerprint: str, ranks: Ranks) -> None:
    """Right after joining: ``ServiceError`` (exit 2) on every rank when any rank's settings
    differ from rank 0's, so that no rank goes on alone into a collective the others never
    reach.  One process: nothing to compare."""
    if not ranks.distributed:
        return
    everyone = ranks.gather(compared(cfg, fingerprint))
    text = described(everyone)
    if text is None:
        return
    if ranks.is_main:
        raise ServiceError(EXIT_CONFIG, f"{text}; {HINT}")
    keys = ", ".join(differing_keys(everyone))
    raise ServiceError(EXIT_CONFIG, f"rank {ranks.rank}: not starting: the ranks' settings differ ({keys}); "
                                    "rank 0's line names them")


def _describe(key: str, mine: dict[str, Any], first: dict[str, Any]) -> str:
    if key == "data":
        return (f"the data of shards {mine['_shards']} (data fingerprint {mine['data']}; rank 0's "
                f"{first['_shards']}: {first['data']})")
    return f"{key} {_shown(mine.get(key))} (rank 0: {_shown(first.get(key))})"


def _shown(value: Any) -> str:
    """As on the command line: true/false, a list comma-separated."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)
