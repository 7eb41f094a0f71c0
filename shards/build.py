"""``make shards``: ImageNet (any supported layout) -> validated, shuffled WebDataset shards.

Steps: scan the input tree -> order each split (train globally shuffled with a fixed seed,
val sorted) -> resume: keep the journaled shards whose sha256 still matches -> write each
split's remaining shards, whole shards per worker -> compute the dataset statistics from the
written training shards -> write ``manifest.json`` last, so a directory with a manifest is
always complete.

SIGINT or SIGTERM (to this process or its whole group) at any moment stops the workers, removes
every temp file and raises ``Interrupted`` with one line saying what was kept; the re-run
writes the same bytes as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter

import numpy as np

from shards import manifest as contract
from shards import stats
from shards.config import ShardConfig
from shards.index_check import index_defect, index_entries_defect
from shards.journal import Journal
from shards.layouts import scan
from shards.outdir import claimed
from shards.phases import Phases
from shards.report import check_trainable, summary, write_skipped
from shards.sources import Inventory, Source
from shards.tarwriter import atomic_write_bytes, atomic_write_text, index_of, sha256_file
from shards.workers import Workers
from shards.write_split import SplitResult, SplitWriter, write_splits

# In the journal's fingerprint: journals of the old writer (shards cut by written count) are not resumed.
PLAN = "runs-v2"


class OtherDataset(RuntimeError):
    """``--out`` holds the finished shards of another dataset: this run would replace them."""


def check_same_dataset(cfg: ShardConfig, inventory: Inventory) -> None:
    """Refuse to write over the finished shards of other classes.  Why: the Makefile's sample
    targets (preview, demo) shard data/sample into data/shards, also the default --out for
    ImageNet, and a ``make demo`` after ``make shards SRC=<imagenet>`` silently replaced ~31 GB of
    shards (hours of work) with 720 sample images.  Other sources of the same classes are the same
    dataset changed: what changed is rebuilt, as before."""
    try:
        m = contract.load(cfg.out, splits=())
    except contract.ManifestError:
        return  # nothing finished there
    if list(m.classes) != list(inventory.classes):
        raise OtherDataset(f"{cfg.out} holds the finished shards of another dataset ({len(m.classes)} classes, "
                           f"{m.record.get('written', '?')} images), {cfg.src} has {len(inventory.classes)} "
                           "classes: writing here would replace them. Choose another --out (make: OUT=dir), "
                           f"or delete {cfg.out} first")


class TooManySkipped(RuntimeError):
    """More inputs were unusable than ``max_skipped_fraction`` allows."""


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run cleanly; ``str()`` is the one line saying what was kept."""


def ordered(inventory: Inventory, split: str, seed: int) -> list[Source]:
    """The split's sources in writing order: train shuffled globally (seeded), val sorted."""
    sources = sorted((s for s in inventory.sources if s.split == split), key=lambda s: s.path)
    if split == "train":
        order = np.random.default_rng(seed).permutation(len(sources))
        sources = [sources[i] for i in order]
    return sources


def fingerprint(cfg: ShardConfig, split: str, sources: list[Source], classes: list[str]) -> str:
    """Identifies (inputs, order, settings): a journal from another fingerprint is discarded."""
    digest = hashlib.sha256(json.dumps([split, cfg.output_parameters(), classes, PLAN]).encode())
    for s in sources:
        digest.update(os.fsencode(f"{s.path}\0{s.wnid}\0{s.size}\n"))  # names need not be UTF-8
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
        "oversize": [o for r in results.values() for o in r.oversize],
    }


def _check_skipped(cfg: ShardConfig, record: dict) -> None:
    share = len(record["skipped"]) / max(record["inputs"], 1)
    if share > cfg.max_skipped_fraction:
        reasons = Counter(s["reason"].split(" (")[0] for s in record["skipped"]).most_common(5)
        report = write_skipped(cfg.out, record["skipped"])
        raise TooManySkipped(
            f"{len(record['skipped'])} of {record['inputs']} inputs ({share:.2%}) were skipped, more than "
            f"max_skipped_fraction={cfg.max_skipped_fraction}; most common reasons: {reasons}. Every skipped "
            f"file and its reason is in {report}. Fix or remove them, or raise max_skipped_fraction."
        )


def _kept(phase: str, writers: list[SplitWriter]) -> str:
    """The interrupt line: where the run was, what stays on disk, how to go on."""
    resume = "re-run the same command to resume"
    if phase == "done":
        return "interrupted after the manifest was written: the shard directory is complete"
    if phase in ("start", "scan", "resume check") or not writers:
        return f"interrupted ({phase}): nothing new was written; {resume}"
    shards = " and ".join(f"{len(w.result.shards)} {w.split} shards ({w.done} of {len(w.sources)} images)"
                          for w in writers)
    missing = {"statistics": "the statistics and the manifest are", "manifest": "the manifest is"}
    what = f"kept {shards}" if phase == "writing" else f"kept every shard ({shards}); {missing[phase]} not written yet"
    return f"interrupted ({phase}): {what}; {resume} (it re-verifies the kept shards' sha256 first, then goes on)"


def _same_build(cfg: ShardConfig, inventory: Inventory, m: contract.Manifest) -> bool:
    """Whether ``m`` (the manifest in ``cfg.out``) is what this run would write: the same sources
    in the same order with the same settings (each split's journal carries the fingerprint and
    covers every source), the same files left out at the scan, and the statistics over the same
    number of training images."""
    for split in contract.SPLITS:
        sources = ordered(inventory, split, cfg.seed)
        entries = Journal(cfg.out / split, fingerprint(cfg, split, sources, inventory.classes)).entries()
        if (entries[-1]["end"] if entries else 0) != len(sources):
            return False
    scan_skipped = [{"path": s.path, "reason": s.reason, "split": s.split} for s in inventory.skipped]
    record = m.record
    train = m.splits["train"].samples
    images = json.loads(m.stats_path.read_text()).get("images")
    return (record["skipped"][:len(scan_skipped)] == scan_skipped and record["ignored"] == inventory.ignored
            and record["parameters"].get("layout") == inventory.layout and images == min(cfg.stats_images or train, train))


def unchanged(cfg: ShardConfig, inventory: Inventory, workers: Workers) -> dict | None:
    """The manifest record of ``cfg.out`` when the directory is finished, this run would write it
    again unchanged, and every shard still has its manifest sha256; None otherwise.  Why: a
    re-run used to delete the manifest first and write it back at its end, so one stopped early
    (``make demo`` re-runs ``make shards``; Ctrl-C in its first seconds) left a finished
    directory without a manifest, which training refuses.  Trusting nothing on disk is kept: the
    shards are re-hashed, as a resume does, while the manifest stays.  An index that does not fit
    its (unchanged) tar is rewritten from it: DALI would skip samples without a word, and the
    service refuses such an index, naming this fix among others."""
    try:
        m = contract.load(cfg.out, splits=())  # the record; the files below
        if not _same_build(cfg, inventory, m):
            return None
        tars = [s for split in contract.SPLITS for s in m.splits[split].shards]
        if any(s.tar.stat().st_size != s.bytes for s in tars):
            return None
    except (contract.ManifestError, OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    gb = sum(s.bytes for s in tars) / 1e9
    print(f"shards: {cfg.out} is finished from these sources and settings: re-verifying the sha256 of "
          f"{len(tars)} shards ({gb:.1f} GB) on {cfg.processes} processes", flush=True)
    if workers.map(sha256_file, [s.tar for s in tars]) != [s.sha256 for s in tars]:
        print("shards: a shard differs from the manifest: rebuilding what changed", flush=True)
        return None
    for shard in tars:  # the tars are the manifest's: an index that does not fit is rewritten from its tar
        # Every entry too (a second or so for ImageNet, beside the hash of its ~31 GB just done).
        if (defect := index_defect(shard, shard.bytes) or index_entries_defect(shard.index)):
            atomic_write_bytes(shard.index, index_of(shard.tar))
            print(f"shards: rewrote {shard.index} from its tar (it {defect})", flush=True)
    return m.record


class _Job:
    """One ``build``: the phases in order, and what the interrupt line needs to know."""

    def __init__(self, cfg: ShardConfig, phases: Phases) -> None:
        self.cfg, self.phases = cfg, phases
        self.writers: list[SplitWriter] = []

    def _verifier(self, workers: Workers, split: str):  # noqa: ANN202 (a Verifier)
        def verify(tars: list) -> list[str]:
            if tars:
                gb = sum(t.stat().st_size for t in tars) / 1e9
                print(f"shards: resuming {split}: re-verifying the sha256 of {len(tars)} finished shards ({gb:.1f} GB) "
                      f"on {self.cfg.processes} processes", flush=True)
            return workers.map(sha256_file, tars)
        return verify

    def _write(self, inventory: Inventory, workers: Workers) -> tuple[dict, dict[str, SplitResult]]:
        cfg = self.cfg
        with self.phases.phase("resume check", workers):
            for split in contract.SPLITS:
                sources = ordered(inventory, split, cfg.seed)
                journal = Journal(cfg.out / split, fingerprint(cfg, split, sources, inventory.classes))
                self.writers.append(SplitWriter(cfg, split, sources, inventory.classes, journal,
                                                self._verifier(workers, split), inventory.root))
        print(f"shards: writing with {cfg.processes} processes, whole shards each", flush=True)
        with self.phases.phase("writing", workers):
            write_splits(cfg, self.writers, workers)
        results = {w.split: w.result for w in self.writers}
        record = _manifest_record(cfg, inventory, results)
        _check_skipped(cfg, record)
        check_trainable(len(self.writers[0].sources), sum(results["train"].class_counts), cfg.src, cfg.out,
                        record["skipped"])
        return record, results

    def _statistics(self, results: dict[str, SplitResult], workers: Workers) -> stats.PixelMoments:
        cfg, train = self.cfg, results["train"].shards
        total = sum(s["samples"] for s in train)
        print(f"shards: dataset statistics over {min(cfg.stats_images or total, total)} of {total} training images",
              flush=True)
        with self.phases.phase("statistics", workers):
            shards = [(cfg.out / "train" / s["tar"], cfg.out / "train" / s["index"], s["samples"]) for s in train]
            return stats.compute(shards, workers, cfg.stats_images, cfg.chunk)

    def run(self) -> dict:
        cfg, started = self.cfg, time.perf_counter()
        with self.phases.phase("scan"):
            print(f"shards: scanning {cfg.src}", flush=True)
            inventory = scan(cfg.src, cfg.val_labels)
        print(f"shards: {cfg.src}: layout {inventory.layout}, {len(inventory.classes)} classes, "
              f"{len(inventory.sources)} images found", flush=True)
        check_same_dataset(cfg, inventory)
        check_trainable(sum(s.split == "train" for s in inventory.sources), None, cfg.src, cfg.out)
        with claimed(cfg.out, inventory.trees):
            return self._build(inventory, started)

    def _build(self, inventory: Inventory, started: float) -> dict:
        cfg = self.cfg
        try:
            with Workers(cfg.processes) as workers:
                with self.phases.phase("resume check", workers):
                    record = unchanged(cfg, inventory, workers)
                if record is not None:
                    print(f"shards: {cfg.out} is complete and unchanged; nothing to do", flush=True)
                    self.phases.current = "done"
                    return record
                (cfg.out / "manifest.json").unlink(missing_ok=True)  # the manifest marks a finished directory
                record, results = self._write(inventory, workers)
                moments = self._statistics(results, workers)
            with self.phases.phase("manifest"):
                stats.write(cfg.out, moments, sum(results["train"].class_counts))
                atomic_write_text(cfg.out / "manifest.json", json.dumps(record, indent=1) + "\n")
        finally:  # the workers are gone by now: nothing can write a temp file any more
            for writer in self.writers:
                writer.remove_temps()
            for tmp in cfg.out.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        self.phases.current = "done"
        print(summary(record, time.perf_counter() - started), flush=True)
        return record


def build(cfg: ShardConfig, phases: Phases | None = None) -> dict:
    """Run the whole sharding job; returns the manifest record.  Raises on fatal problems.

    On SIGINT/SIGTERM (a ``KeyboardInterrupt`` here) raises ``Interrupted`` once every worker
    is gone and every temp file removed.  ``phases`` (optional) receives each phase's cost.
    """
    job = _Job(cfg, phases or Phases())
    try:
        return job.run()
    except KeyboardInterrupt:
        raise Interrupted(_kept(job.phases.current, job.writers)) from None
