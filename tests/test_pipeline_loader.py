"""The PyTorch-facing loaders: exact epochs over 1 and 2 ranks, resume.
(Their agreement with the reference loader: ``tests/test_pipeline_reference.py``.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import LoaderConfig, average_views, build_eval_loader, build_train_loader
from pipeline.reference import index_keys, key_number
from shards.manifest import load

ROOT = Path(__file__).resolve().parents[1]
CFG = LoaderConfig(batch_size=32, threads=2, shuffle_buffer=64)

# Run in a fresh interpreter: one rank of a training run (optionally resuming from a state file).
WORKER = r"""
import json, sys
from pipeline import LoaderConfig, build_train_loader
shards, rank, world, epochs, stop, save, resume = sys.argv[1:8]
cfg = LoaderConfig(batch_size=32, threads=2, shuffle_buffer=64)
loader = build_train_loader(shards, int(rank), int(world), "cpu", cfg, ids=True)
if resume != "-":
    loader.load_state_dict(json.load(open(resume)))
out = {"len": len(loader), "epochs": []}
for epoch in range(int(epochs)):
    ids = []
    for b, (images, labels, i) in enumerate(loader):
        assert images.shape[1:] == (3, 224, 224) and images.dtype.is_floating_point
        ids += i.tolist()
        if epoch == 0 and int(stop) == b + 1 and save != "-":
            json.dump(loader.state_dict(), open(save, "w"))
            print(json.dumps({"before": ids}), flush=True)
            ids = []
    out["epochs"].append(ids)
print(json.dumps(out))
"""


def run_worker(*args: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WORKER, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> list[dict]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def split_ids(shards: Path, split: str) -> list[int]:
    return sorted(key_number(k) for s in load(shards).splits[split].shards for k in index_keys(s.index))


def test_one_rank_every_sample_once_per_epoch_and_order_changes(sample_shards):
    loader = build_train_loader(sample_shards, config=CFG, ids=True)
    manifest = load(sample_shards)
    assert len(loader) == 5  # 144 samples / 32, the last batch short
    epochs = []
    for _ in range(2):
        ids, counts = [], Counter()
        for images, labels, i in loader:
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            ids += i.tolist()
            counts.update(labels.tolist())
        assert sorted(ids) == split_ids(sample_shards, "train")
        assert [counts[c] for c in range(manifest.num_classes)] == list(manifest.splits["train"].class_counts)
        epochs.append(ids)
    assert epochs[0] != epochs[1]


@pytest.mark.slow
def test_two_ranks_in_separate_processes_cover_the_split_exactly(sample_shards):
    procs = [run_worker(sample_shards, rank, 2, 2, 0, "-", "-") for rank in (0, 1)]
    results = [finish(p)[-1] for p in procs]
    for epoch in range(2):
        union = sorted(results[0]["epochs"][epoch] + results[1]["epochs"][epoch])
        assert union == split_ids(sample_shards, "train")
    assert all(r["len"] == 3 for r in results)  # 72 samples per rank


def test_uneven_ranks_padding_never_delivered(sample_shards):
    """36 val samples over 5 ranks (7,7,7,7,8), batch 7: the reader pads, the iterator drops
    the pads; every rank yields 2 batches, the 7-sample ranks an empty second one."""
    seen = []
    for rank in range(5):
        loader = build_eval_loader(sample_shards, rank, 5, "cpu", LoaderConfig(batch_size=7, threads=1), ids=True)
        sizes = [len(batch) for _, _, batch in loader]
        assert sizes == ([7, 1] if rank == 4 else [7, 0]) and len(loader) == 2
        for _ in range(2):  # the same part every epoch
            ids = [i for _, _, batch in loader for i in batch.tolist()]
            assert len(ids) == loader.samples == (8 if rank == 4 else 7)
        seen += ids
    assert sorted(seen) == split_ids(sample_shards, "val")


@pytest.mark.slow
def test_resume_mid_epoch_in_a_new_process(sample_shards, tmp_path):
    state = tmp_path / "state.json"
    first = finish(run_worker(sample_shards, 0, 1, 2, 2, state, "-"))
    before, full = first[0]["before"], first[1]["epochs"]
    resumed = finish(run_worker(sample_shards, 0, 1, 2, 0, "-", state))[-1]["epochs"]
    # The resumed process continues with exactly the uninterrupted sequence (rest of epoch 0, then epoch 1).
    assert resumed[0] == full[0]
    assert sorted(before + resumed[0]) == split_ids(sample_shards, "train")
    assert resumed[1] == full[1]


def test_same_seed_same_batches_other_seed_differs(sample_shards):
    def first(seed: int, rank: int = 0) -> torch.Tensor:
        return next(iter(build_train_loader(sample_shards, rank, 2, "cpu", CFG.replace(seed=seed))))[0]

    a = first(1)
    assert torch.equal(a, first(1))
    assert not torch.equal(a, first(2))
    assert not torch.equal(a, first(1, rank=1))


def test_state_dict_rejects_other_ranks(sample_shards):
    state = build_train_loader(sample_shards, 0, 2, "cpu", CFG).state_dict()
    with pytest.raises(ValueError, match="rank"):
        build_train_loader(sample_shards, 1, 2, "cpu", CFG).load_state_dict(state)


@pytest.mark.parametrize("change", [{"batch_size": 7}, {"shuffle_buffer": 8}, {"shuffle_shards": False}])
def test_state_dict_rejects_another_batch_or_shuffle(sample_shards, change):
    """The position counts batches of the saved size and DALI's checkpoint is of the saved reader:
    resumed with another batch size or shuffle, an epoch repeated or dropped samples (batch 16 -> 7:
    18 delivered twice; shuffle buffer 64 -> 8: 18 never), so such a state is refused."""
    state = build_train_loader(sample_shards, 0, 1, "cpu", CFG).state_dict()
    with pytest.raises(ValueError, match=next(iter(change))):
        build_train_loader(sample_shards, 0, 1, "cpu", CFG.replace(**change)).load_state_dict(state)


@pytest.mark.parametrize("build", [build_train_loader, build_eval_loader])
def test_a_checked_manifest_is_not_read_again(sample_shards, tmp_path, build):
    """The service checks the manifest and every index once at start and hands the ``Manifest``
    over; the loaders read it again (manifest.json and each ``.idx``) when given only the path."""
    copy = tmp_path / "shards"
    copy.mkdir()
    for f in sample_shards.rglob("*"):
        if f.is_file():
            (copy / f.relative_to(sample_shards)).parent.mkdir(parents=True, exist_ok=True)
            (copy / f.relative_to(sample_shards)).symlink_to(f)
    manifest, steps = load(copy), len(build(copy, 0, 1, "cpu", CFG))
    (copy / "manifest.json").unlink()
    loader = build(manifest, 0, 1, "cpu", CFG)
    assert len(loader) == steps and len(next(iter(loader))[1]) == CFG.batch_size


@pytest.mark.parametrize("build", [build_train_loader, build_eval_loader])
def test_a_crop_larger_than_the_images_is_refused(sample_shards, build):
    """DALI's random anchor of a train crop past the image had an empty range to draw from: the
    process died of SIGSEGV; said as the evaluation's view anchors already said it."""
    with pytest.raises(ValueError, match="crop 257 does not fit the shards' 256-pixel images"):
        build(sample_shards, 0, 1, "cpu", CFG.replace(crop=257))


@pytest.mark.parametrize("size", [512, 200])
def test_a_manifest_whose_image_size_is_not_the_images_is_named(sample_shards, tmp_path, size):
    """A manifest edited to another ``parameters.size`` than its shards were made with: DALI's
    cropping window failed past the image (512), or the crop was said not to fit (200), and
    neither named the key.  The mean image is made with the images, so it is the witness."""
    import shutil

    from shards.manifest import ManifestError

    copy = tmp_path / "shards"
    shutil.copytree(sample_shards, copy)
    record = json.loads((copy / "manifest.json").read_text())
    record["parameters"]["size"] = size
    (copy / "manifest.json").write_text(json.dumps(record))
    said = rf"manifest.json: parameters.size {size} is not the 256x256 of the images' mean image .*stats.json.*make shards"
    for build in (build_train_loader, build_eval_loader):
        with pytest.raises(ManifestError, match=said):
            build(copy, 0, 1, "cpu", CFG)


def test_loader_is_raw_batches_through_the_normalizer(sample_shards):
    """``__iter__`` == ``raw_batches`` + ``normalize`` (same seed), in the requested dtype."""
    cfg = CFG.replace(dtype="bfloat16")
    raw = next(build_train_loader(sample_shards, config=cfg).raw_batches())
    assert raw.images.dtype == torch.uint8 and raw.images.shape[1:] == (224, 224, 3)
    assert raw.anchors.shape == (32, 2) and raw.alpha.shape == (32, 3) and raw.mirror.numel() == 32
    loader = build_train_loader(sample_shards, config=cfg)
    images, labels = next(iter(loader))
    assert images.dtype == torch.bfloat16 and images.shape == (32, 3, 224, 224)
    assert torch.equal(images, loader.normalize(raw)) and torch.equal(labels, raw.labels)


def storages(obj: object) -> set[int]:
    """The storages of every tensor in ``obj`` (nested dicts, tuples, lists, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        return {obj.untyped_storage().data_ptr()} if obj.numel() else set()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else \
        vars(obj).values() if hasattr(obj, "__dict__") else ()
    return set().union(*map(storages, items))


def test_everything_dali_handed_out_is_held_until_the_consumer_ran(sample_shards):
    """On a GPU a batch's buffers stay alive (``_GpuKeepAlive``) until the kernels queued on it
    have run; the label bytes are read by one of them (``ascii_ints_torch``), so they must be
    held too, not only what ``RawBatch`` keeps (they were not: a lagging stream could then parse
    a later batch's labels).  Checked on the CPU with a keep-alive that records what it holds."""
    loader = build_train_loader(sample_shards, config=CFG)
    handed_out, held = [], []
    take = loader._it._take
    loader._it._take = lambda: handed_out.append(take()) or handed_out[-1]
    loader._keepalive = SimpleNamespace(hold=held.append)
    for _ in loader:
        pass
    assert len(held) == len(handed_out) == len(loader)
    for outputs, kept in zip(handed_out, held):
        assert {"images", "labels", "anchors", "mirror", "alpha"} <= set(outputs)
        assert storages(outputs) <= storages(kept)


def test_average_views():
    logits = torch.randn(3 * 10, 5)
    probs = average_views(logits, 10)
    assert probs.shape == (3, 5)
    torch.testing.assert_close(probs[1], torch.softmax(logits[10:20], 1).mean(0))


def test_a_label_that_is_no_class_index_stops_the_loader_and_the_service_names_the_sample(sample_shards, tmp_path):
    """A ``.cls`` byte changed after sharding (same size: only the checksum tells, and the service
    hashes in the background while training starts) reached ``cross_entropy``, whose IndexError
    ended the run in a traceback.  Now the loader refuses the batch and the service's diagnosis
    names the shard and the sample."""
    import shutil
    import tarfile

    from service.data_errors import diagnose, guarded
    from service.errors import DataError

    copy = tmp_path / "shards"
    shutil.copytree(sample_shards, copy)
    tar = copy / "train" / "train-000001.tar"
    with tarfile.open(tar) as archive:
        member = next(m for m in archive if m.name.endswith(".cls"))
    data = bytearray(tar.read_bytes())
    data[member.offset_data] = ord("9")  # 6 classes: 9 is none of them
    tar.write_bytes(data)
    manifest = load(copy)
    loader = build_train_loader(manifest, config=CFG.replace(shuffle_buffer=1, shuffle_shards=False))
    with pytest.raises(ValueError, match="holds label 9, not a class index \\(the shards have 6 classes\\)"):
        for _ in loader:
            pass
    loader = build_train_loader(manifest, config=CFG.replace(shuffle_buffer=1, shuffle_shards=False))
    with pytest.raises(DataError) as info:
        for _ in guarded(loader, lambda exc: diagnose(exc, manifest, "train")):
            pass
    message = str(info.value)
    key = member.name.split(".")[0]
    assert message.startswith(f"train shard {tar}: contents differ from the manifest's sha256"), message
    assert f"sample {key} " in message and "label b'9' is not a class index" in message, message
