"""The labels a batch carries are the tars' own (CPU-only DALI): each sample's class index and
id as ``make shards`` wrote them, and on every graph (the GPU ones included) the label bytes
stay on the host, where the loader checks them against the class count before any copy."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import LoaderConfig
from pipeline.labels import ascii_ints, key_numbers
from tests.test_pipeline import debug_pipeline, run_batches


def tar_labels(shards: Path, split: str) -> dict[int, int]:
    """sample number -> class index, read straight from the tars."""
    out = {}
    for tar_path in sorted((shards / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".cls"):
                    key = member.name.split(".", 1)[0]
                    out[int(key.rsplit("-", 1)[1])] = int(tar.extractfile(member).read())
    return out


def test_labels_and_ids_match_the_tars(sample_shards):
    truth = tar_labels(sample_shards, "train")
    _, pipe = debug_pipeline(sample_shards, shuffle_shards=False)
    batches = run_batches(pipe, 3)
    labels = np.concatenate([ascii_ints(np.stack(b[1])) for b in batches])
    ids = np.concatenate([key_numbers(np.stack(b[2])) for b in batches])
    seen = list(zip(ids.tolist(), labels.tolist()))[:144]
    assert {i for i, _ in seen} == set(truth)
    assert all(truth[i] == label for i, label in seen)


@pytest.mark.parametrize("train, gpu_roi", [(True, False), (True, True), (False, False)])
def test_the_gpu_graphs_hand_the_label_bytes_to_the_host(sample_shards, train, gpu_roi):
    """The loader's label check (``tests/test_pipeline_loader.py``) reads labels on the host,
    where it costs no wait for the device; the GPU graphs copied the label bytes to the GPU inside
    the graph, so on a GPU the check was skipped and a label past the class count reached
    ``cross_entropy`` (a device-side assert, or garbage).  Now every graph hands its label bytes
    over on the host (as the reader reads them, before the mixed stage) and the loader checks them
    there, then copies the parsed labels from pinned memory (``to_device``).  The graph is only
    defined here (no GPU needed)."""
    import dataclasses

    from nvidia.dali.pipeline import Pipeline

    from pipeline import _spec
    from pipeline.graph import EVAL_OUTPUTS, TRAIN_OUTPUTS, eval_graph, train_graph

    spec = _spec(sample_shards, "train" if train else "val", 0, 1, torch.device("cpu"),
                 LoaderConfig(batch_size=8, threads=1, gpu_roi_decode=gpu_roi), train, 1, False)
    spec = dataclasses.replace(spec, gpu=True)
    with Pipeline(batch_size=2, num_threads=1, device_id=None):
        outputs = dict(zip(TRAIN_OUTPUTS if train else EVAL_OUTPUTS, (train_graph if train else eval_graph)(spec)))
    assert outputs["images"].device == "gpu"  # the GPU graph indeed
    assert outputs["labels"].device == "cpu"
