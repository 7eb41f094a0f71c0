"""The settings judged against the shards and this machine (``service.data_fit``): the shuffle
buffer's memory, as arithmetic; the real service's refusal is in tests/test_service_failures.py."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import LoaderConfig
from sampledata.generate import SampleConfig, generate
from service.config import TrainConfig
from service.data_fit import available_memory, check_fits_data, shuffle_buffer_problem
from service.dist import Ranks
from service.errors import ServiceError
from shards import manifest as contract
from shards.build import build
from shards.config import ShardConfig


def test_a_shuffle_buffer_may_take_a_quarter_of_the_available_memory_shared_by_the_local_ranks() -> None:
    assert shuffle_buffer_problem(20_000, 25_000, 4_000_000_000, 2) is None  # 500 MB: an eighth of 4 GB
    assert shuffle_buffer_problem(20_001, 25_000, 4_000_000_000, 2) == (
        "loader.shuffle_buffer 20001 would hold about 0.5 GB of encoded training samples in memory (25000 bytes "
        "each, the shards' mean): more than 1/4 of the 4.0 GB available on this machine, shared by 2 ranks: use at "
        "most 20000")
    assert shuffle_buffer_problem(10**9, 23_481, 21_300_000_000, 1).endswith(
        "about 23,481.0 GB of encoded training samples in memory (23481 bytes each, the shards' mean): more than 1/4 "
        "of the 21.3 GB available on this machine: use at most 226779")


def test_the_estimate_is_the_shards_mean_bytes_per_training_sample(sample_shards: Path) -> None:
    manifest = contract.read(sample_shards)
    train = manifest.splits["train"].shards
    mean = -(-sum(s.bytes for s in train) // sum(s.samples for s in train))
    cfg = TrainConfig(shards=sample_shards)
    fits = 4 * 1024 * mean  # the default buffer, 1024, is exactly a quarter
    check_fits_data(cfg, manifest, (), Ranks(), available=fits)
    with pytest.raises(ServiceError, match=f"loader.shuffle_buffer 1024 would hold .* \\({mean} bytes each.*use at "
                                           "most 1023$") as refused:
        check_fits_data(cfg, manifest, (), Ranks(), available=fits - 1)
    assert refused.value.code == 2
    assert 0 < available_memory() <= 2**50


@pytest.fixture(scope="module")
def few_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 training and 2 validation images (2 classes)."""
    src, out = tmp_path_factory.mktemp("few_src"), tmp_path_factory.mktemp("few_shards")
    generate(SampleConfig(out=src, classes=2, train_per_class=3, val_per_class=1, seed=1))
    build(ShardConfig(src=src, out=out, shard_samples=2, workers=1).validate())
    return out


@pytest.mark.parametrize("world, batch, expected", [
    (3, 2, "has 2 validation images, fewer than the 3 ranks that each evaluate a part of them: start at most 2 rank"),
    (7, 2, re.escape("has 6 training images, fewer than the 7 ranks (each needs a batch of its own): start at most 3 "
                     "rank(s) at loader.batch_size 2; ") + ".* has 2 validation images, fewer than the 7 ranks"),
    (2, 4, "loader.batch_size 4 is more than the 3 training images each of the 2 rank"),
])
def test_more_ranks_than_images_in_a_split_is_refused_naming_the_split(few_shards: Path, world: int, batch: int,
                                                                       expected: str) -> None:
    """DALI's reader refuses more ranks than samples; the service reported it as a failed val
    loader after hashing the val shards, "the failure is elsewhere (memory, DALI, the decoder)"."""
    cfg = TrainConfig(shards=few_shards, loader=LoaderConfig(batch_size=batch))
    with pytest.raises(ServiceError, match=expected) as refused:
        check_fits_data(cfg, contract.read(few_shards), (), Ranks(0, world, 0, world), available=2**40)
    assert refused.value.code == 2
    check_fits_data(TrainConfig(shards=few_shards, loader=LoaderConfig(batch_size=1)), contract.read(few_shards), (),
                    Ranks(0, 2, 0, 2), available=2**40)
