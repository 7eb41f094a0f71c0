"""``pipeline.iterator.DaliIterator`` against DALI's own ``DALIGenericIterator`` on identically
built pipelines: the same batches (pixels, labels, ids, augmentation draws), the same lengths and
per-rank sample counts, epoch after epoch, for 1-3 ranks over a split that does not divide evenly;
the same resume positions from each other's checkpoints."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipeline import LoaderConfig, _spec, build_train_loader
from pipeline.graph import EVAL_OUTPUTS, READER, TRAIN_OUTPUTS, build_pipeline
from pipeline.iterator import DaliIterator, shard_sizes
from pipeline.loader import _encode
from sampledata.generate import SampleConfig, generate
from shards.build import build
from shards.config import ShardConfig

EPOCHS = 3


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """35 training and 15 validation images: no rank count from 2 up divides them evenly."""
    src = tmp_path_factory.mktemp("odd-sample")
    generate(SampleConfig(out=src, classes=5, train_per_class=7, val_per_class=3, seed=4))
    out = tmp_path_factory.mktemp("odd-shards")
    build(ShardConfig(src=src, out=out, shard_samples=6, workers=1).validate())
    return out


def spec(shards: Path, train: bool, rank: int, world: int, batch: int):
    cfg = LoaderConfig(batch_size=batch, threads=2, shuffle_buffer=16)
    return _spec(shards, "train" if train else "val", rank, world, torch.device("cpu"), cfg, train, 1, False)


def names(train: bool) -> tuple[str, ...]:
    return TRAIN_OUTPUTS if train else EVAL_OUTPUTS


def dali_reference(s, rank: int, checkpoint: bytes | None = None) -> DALIGenericIterator:
    return DALIGenericIterator([build_pipeline(s, None, rank, checkpoint)], list(names(s.train)), reader_name=READER,
                               last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True, prepare_first_batch=False)


def ours(s, rank: int, checkpoint: bytes | None = None) -> DaliIterator:
    return DaliIterator(build_pipeline(s, None, rank, checkpoint), READER, names(s.train))


def copied(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in batch.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def reference_epoch(it: DALIGenericIterator) -> list[dict[str, torch.Tensor]]:
    return [copied(batch[0]) for batch in it]


@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
@pytest.mark.parametrize("world,batch", [(1, 8), (2, 4), (2, 18), (3, 5)])
def test_same_batches_lengths_and_samples_as_dali_iterator(odd_shards: Path, train: bool, world: int,
                                                           batch: int) -> None:
    for rank in range(world):
        s = spec(odd_shards, train, rank, world, batch)
        theirs, mine = dali_reference(s, rank), ours(s, rank)
        assert len(mine) == len(theirs)
        for epoch in range(EPOCHS):
            # DALI's iterator keeps the sample count of the shard it reads in private fields
            # (this test is the only place that reads them).
            expected = int(theirs._shard_sizes_per_gpu_initial[theirs._shards_id[0]])
            assert mine.samples(epoch) == expected
            reference = reference_epoch(theirs)
            got = [copied(b) for b in mine.epoch(epoch)]
            assert len(got) == len(reference) == len(mine)
            assert [len(b["labels"]) for b in got] == [len(b["labels"]) for b in reference]
            assert sum(len(b["labels"]) for b in got) == expected
            assert all(same(a, b) for a, b in zip(got, reference)), (rank, epoch)


def test_an_empty_last_batch(odd_shards: Path) -> None:
    """35 samples over 2 ranks (17, 18), batch 17: rank 0's second batch is empty, rank 1's has one."""
    for rank, sizes in ((0, [17, 0]), (1, [17, 1])):
        mine = ours(spec(odd_shards, True, rank, 2, 17), rank)
        assert [len(b["labels"]) for b in mine.epoch(0)] == sizes


def test_shard_sizes_split_like_dali_readers() -> None:
    assert shard_sizes(35, 3) == [11, 12, 12] and shard_sizes(36, 5) == [7, 7, 7, 7, 8]
    assert sum(shard_sizes(1_281_167, 7)) == 1_281_167


@pytest.mark.parametrize("from_reference", [True, False], ids=["dali-checkpoint", "own-checkpoint"])
def test_resume_positions_match(odd_shards: Path, from_reference: bool) -> None:
    """Stop 2 batches into the second epoch (rank 1 of 2, which by then reads the other shard),
    restore from the checkpoint taken there, and continue: the same batches as without a stop."""
    s = spec(odd_shards, True, 1, 2, 4)
    uninterrupted = dali_reference(s, 1)
    first, second = reference_epoch(uninterrupted), reference_epoch(uninterrupted)
    third = reference_epoch(uninterrupted)
    if from_reference:
        stopped = dali_reference(s, 1)
        reference_epoch(stopped)
        for _ in zip(range(2), stopped):
            pass
        checkpoint = stopped.checkpoints()[0]
    else:
        stopped = ours(s, 1)
        list(stopped.epoch(0))
        for _ in zip(range(2), stopped.epoch(1)):
            pass
        checkpoint = stopped.checkpoint()
    resumed = ours(s, 1, checkpoint)
    rest = [copied(b) for b in resumed.epoch(1, done=2)]
    assert len(first) == len(rest) + 2
    assert all(same(a, b) for a, b in zip(rest, second[2:]))
    assert all(same(a, b) for a, b in zip([copied(b) for b in resumed.epoch(2)], third))


def test_loader_state_saved_through_dali_iterator_still_loads(odd_shards: Path) -> None:
    """A loader state of version 2 (its DALI checkpoint taken by DALIGenericIterator, as the
    loader did before) continues exactly where an uninterrupted loader goes."""
    cfg = LoaderConfig(batch_size=4, threads=2, shuffle_buffer=16)
    s = spec(odd_shards, True, 0, 1, 4)
    old = dali_reference(s, 0)
    for _ in zip(range(3), old):
        pass
    state = {"version": 2, "dali": _encode(old.checkpoints()[0]), "epoch": 0, "batches": 3, "rank": 0,
             "num_shards": 1, "seed": 0, "graph": "cpu"}
    resumed = build_train_loader(odd_shards, config=cfg, ids=True)
    resumed.load_state_dict(state)
    whole = build_train_loader(odd_shards, config=cfg, ids=True)
    expected = [ids.tolist() for _, _, ids in whole][3:] + [ids.tolist() for _, _, ids in whole]
    got = [ids.tolist() for _, _, ids in resumed] + [ids.tolist() for _, _, ids in resumed]
    assert got == expected and resumed.epoch == 2


@pytest.mark.parametrize("world", [1, 2])  # 2: rank 1's shard is short, its last batch too
def test_a_state_saved_after_the_epochs_last_batch_resumes_with_the_next_epoch_whole(odd_shards: Path,
                                                                                     world: int) -> None:
    """A state taken once the epoch's last batch was handed out, before the loop asked for the
    next (the consumer's last step checkpoints): the loader resumed into what was left of that
    epoch, nothing, so its next epoch was empty and a trainer ran an epoch of no steps.  Now the
    next epoch starts whole, the batches the uninterrupted loader delivers."""
    cfg = LoaderConfig(batch_size=4, threads=2, shuffle_buffer=16)
    loader = build_train_loader(odd_shards, world - 1, world, config=cfg, ids=True)
    for batch, _ in enumerate(loader):
        if batch == len(loader) - 1:
            state = loader.state_dict()
    resumed = build_train_loader(odd_shards, world - 1, world, config=cfg, ids=True)
    resumed.load_state_dict(state)
    expected = [ids.tolist() for _, _, ids in loader]
    got = [ids.tolist() for _, _, ids in resumed]
    assert len(got) == len(loader) and got == expected and resumed.epoch == loader.epoch == 2


def test_rejects_a_reader_without_padding(odd_shards: Path) -> None:
    from nvidia.dali import fn, pipeline_def

    s = spec(odd_shards, False, 0, 1, 4)

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, exec_dynamic=True)
    def unpadded():
        jpg = fn.readers.webdataset(paths=list(s.tars), index_paths=list(s.indexes), ext=["jpg"], name=READER)
        return jpg

    with pytest.raises(ValueError, match="pad_last_batch"):
        DaliIterator(unpadded(), READER, ("jpg",))


def test_handover_names_the_bad_value(odd_shards: Path) -> None:
    s = dataclasses.replace(spec(odd_shards, False, 0, 1, 4))
    with pytest.raises(ValueError, match="handover"):
        DaliIterator(build_pipeline(s, None), READER, names(False), "device")  # type: ignore[arg-type]
