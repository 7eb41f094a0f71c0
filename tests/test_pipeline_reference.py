"""The reference loader (``pipeline.reference``: Pillow decodes, PyTorch workers) agrees with DALI:
the same evaluation views to within IDCT rounding, exact epochs over two ranks, and train crops
cut at its own random draws.  It is the second opinion the DALI loader is checked against.
(The DALI loaders themselves: ``tests/test_pipeline_loader.py``.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import LoaderConfig, build_eval_loader
from pipeline.reference import build_reference_loader
from shards.manifest import load
from tests.test_pipeline_loader import CFG, split_ids


@pytest.mark.parametrize("views", [1, 10])
def test_dali_eval_matches_reference_loader(sample_shards, views):
    """Deterministic views: DALI and Pillow decode the same JPEGs to within IDCT rounding."""
    cfg = LoaderConfig(batch_size=12, threads=2)
    dali = {i: x for images, _, ids in build_eval_loader(sample_shards, config=cfg, views=views, ids=True)
            for i, x in zip(ids.tolist(), images)}
    ref = {i: x for images, _, ids in build_reference_loader(sample_shards, config=cfg, train=False, views=views,
                                                             ids=True) for i, x in zip(ids.tolist(), images)}
    assert dali.keys() == ref.keys() and len(dali) == 36
    diff = torch.stack([(dali[i] - ref[i]).abs() for i in dali])
    assert diff.mean() < 1.0 and diff.max() <= 16.0, (diff.mean(), diff.max())


def test_reference_train_loader_exact_epochs_and_two_ranks(sample_shards):
    seen = []
    for rank in (0, 1):
        loader = build_reference_loader(sample_shards, rank, 2, config=CFG, ids=True)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(x.shape[1:] == (3, 224, 224) and x.dtype == torch.float32 for x, _, _ in batches)
        seen += [i for _, _, ids in batches for i in ids.tolist()]
    assert sorted(seen) == split_ids(sample_shards, "train")


def test_reference_train_transform_matches_its_draws(sample_shards):
    """The reference workers return the uint8 window at their own draws (the flip and the float
    part are the shared normaliser's, tested in test_pipeline_normalize)."""
    import webdataset as wds

    import pipeline.reference as ref
    from pipeline.views import crop_hwc

    loader = build_reference_loader(sample_shards, config=CFG)
    tar = load(sample_shards).splits["train"].shards[0].tar
    sample = next(iter(wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)))
    ref._RNG = np.random.default_rng(7)
    crop, label, ident, anchors, mirror, alpha = loader.transform(sample)
    rng = np.random.default_rng(7)
    x0, y0 = rng.integers(0, [33, 33])
    flip, draw = rng.random() < 0.5, rng.normal(0.0, CFG.sigma, 3)
    assert anchors.tolist() == [x0, y0] and mirror == int(flip) and label == int(sample["cls"])
    np.testing.assert_allclose(alpha.numpy(), draw, rtol=1e-6)
    np.testing.assert_array_equal(crop.numpy(), crop_hwc(ref.decode(sample["jpg"]), x0, y0, 224, False))
