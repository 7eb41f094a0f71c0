"""``make shards``: ImageNet (any supported layout) -> validated, shuffled WebDataset shards.

Steps: scan the input tree -> order each split (train globally shuffled with a fixed seed,
val sorted) -> write each split's shards in parallel (resumable) -> compute the dataset
statistics from the written training shards -> write ``manifest.json`` last, so a directory
with a manifest is always complete.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from multiprocessing import get_context

import numpy as np

from shards import manifest as contract
from shards import stats
from shards.config import ShardConfig
from shards.journal import Journal
from shards.layouts import scan
from shards.sources import Inventory, Source
from shards.tarwriter import atomic_write_text
from shards.write_split import SplitResult, SplitWriter, init_worker, write_splits


class TooManySkipped(RuntimeError):
    """More inputs were unusable than ``max_skipped_fraction`` allows."""


def ordered(inventory: Inventory, split: str, seed: int) -> list[Source]:
    """The split's sources in writing order: train shuffled globally (seeded), val sorted."""
    sources = sorted((s for s in inventory.sources if s.split == split), key=lambda s: s.path)
    if split == "train":
        order = np.random.default_rng(seed).permutation(len(sources))
        sources = [sources[i] for i in order]
    return sources


def fingerprint(cfg: ShardConfig, split: str, sources: list[Source], classes: list[str]) -> str:
    """Identifies (inputs, order, settings): a journal from another fingerprint is discarded."""
    digest = hashlib.sha256(json.dumps([split, cfg.output_parameters(), classes]).encode())
    for s in sources:
        digest.update(f"{s.path}\0{s.wnid}\0{s.size}\n".encode())
    return digest.hexdigest()


def _manifest_record(cfg: ShardConfig, inventory: Inventory, results: dict[str, SplitResult]) -> dict:
    skipped = [{"path": s.path, "reason": s.reason, "split": s.split} for s in inventory.skipped]
    skipped += [s for r in results.values() for s in r.skipped]
    written = sum(sum(r.class_counts) for r in results.values())
    return {
        "format": contract.FORMAT,
        "format_version": contract.VERSION,
        "parameters": {**cfg.output_parameters(), "layout": inventory.layout},
        "classes": [{"index": i, "wnid": w, "name": inventory.names.get(w)} for i, w in enumerate(inventory.classes)],
        "splits": {name: {"samples": sum(r.class_counts), "class_counts": r.class_counts, "shards": r.shards}
                   for name, r in results.items()},
        "stats": "stats.json",
        "inputs": written + len(skipped),
        "written": written,
        "converted": [c for r in results.values() for c in r.converted],
        "skipped": skipped,
        "ignored": inventory.ignored,
    }


def _check_skipped(cfg: ShardConfig, record: dict) -> None:
    share = len(record["skipped"]) / max(record["inputs"], 1)
    if share > cfg.max_skipped_fraction:
        reasons = Counter(s["reason"].split(" (")[0] for s in record["skipped"]).most_common(5)
        report = cfg.out / "skipped.json"
        atomic_write_text(report, json.dumps(record["skipped"], indent=1) + "\n")
        raise TooManySkipped(
            f"{len(record['skipped'])} of {record['inputs']} inputs ({share:.2%}) were skipped, more than "
            f"max_skipped_fraction={cfg.max_skipped_fraction}; most common reasons: {reasons}. Every skipped "
            f"file and its reason is in {report}. Fix or remove them, or raise max_skipped_fraction."
        )


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
    return "\n".join(lines)


def build(cfg: ShardConfig) -> dict:
    """Run the whole sharding job; returns the manifest record.  Raises on fatal problems."""
    started = time.perf_counter()
    inventory = scan(cfg.src, cfg.val_labels)
    print(f"shards: {cfg.src}: layout {inventory.layout}, {len(inventory.classes)} classes, "
          f"{len(inventory.sources)} images found")
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "manifest.json").unlink(missing_ok=True)  # the manifest marks a finished directory
    writers = []
    for split in contract.SPLITS:
        sources = ordered(inventory, split, cfg.seed)
        journal = Journal(cfg.out / split, fingerprint(cfg, split, sources, inventory.classes))
        writers.append(SplitWriter(cfg, split, sources, inventory.classes, journal))
    results: dict[str, SplitResult] = {w.split: w.result for w in writers}
    with get_context("fork").Pool(cfg.processes, init_worker, (cfg.size, cfg.quality, str(inventory.root))) as pool:
        write_splits(cfg, writers, pool)
        record = _manifest_record(cfg, inventory, results)
        _check_skipped(cfg, record)
        train = [(cfg.out / "train" / s["tar"], s["samples"]) for s in results["train"].shards]
        total = sum(n for _, n in train)
        print(f"shards: dataset statistics over {min(cfg.stats_images or total, total)} of {total} training images")
        moments = stats.compute(train, pool, cfg.stats_images)
    stats.write(cfg.out, moments, sum(results["train"].class_counts))
    atomic_write_text(cfg.out / "manifest.json", json.dumps(record, indent=1) + "\n")
    print(summary(record, time.perf_counter() - started))
    return record
