"""The shards `make shards` writes: readable by tar, webdataset and DALI; labels and counts right."""
from __future__ import annotations

import json
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from shards import manifest as contract


def _samples(shards: Path, split: str) -> list[dict]:
    m = contract.load(shards)
    urls = [str(s.tar) for s in m.splits[split].shards]
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_manifest_accounts_for_every_input(sample_src: Path, sample_shards: Path) -> None:
    record = json.loads((sample_shards / "manifest.json").read_text())
    images = [p for p in sample_src.rglob("*.JPEG")]
    assert record["inputs"] == len(images) == record["written"] + len(record["skipped"])
    assert record["skipped"] == []
    assert sorted(c["reason"].split(";")[0] for c in record["converted"]) == sorted(
        ["CMYK converted to RGB", "PNG file re-encoded as JPEG", "grayscale converted to RGB"])
    m = contract.load(sample_shards, deep=True)
    assert m.classes == tuple(sorted(p.name for p in (sample_src / "train").iterdir()))
    for split in ("train", "val"):
        on_disk = Counter(p.parent.name for p in (sample_src / split).rglob("*.JPEG"))
        assert list(m.splits[split].class_counts) == [on_disk[w] for w in m.classes]
        assert sum(s.samples for s in m.splits[split].shards) == m.splits[split].samples == sum(on_disk.values())
        assert all(s.samples <= 20 for s in m.splits[split].shards)


def test_webdataset_reads_labels_right(sample_src: Path, sample_shards: Path) -> None:
    m = contract.load(sample_shards)
    for split in ("train", "val"):
        samples = _samples(sample_shards, split)
        assert len(samples) == m.splits[split].samples
        sources = set()
        for s in samples:
            meta = json.loads(s["json"])
            label = int(s["cls"])
            assert m.classes[label] == meta["wnid"]
            assert meta["class"] == label
            # The label comes from where the file lives in the input tree.
            assert Path(meta["source"]).parent.name == meta["wnid"]
            assert s["jpg"][:3] == b"\xff\xd8\xff"
            sources.add(meta["source"])
        assert sources == {str(p.relative_to(sample_src)) for p in (sample_src / split).rglob("*.JPEG")}


def test_train_is_shuffled_globally_and_val_sorted(sample_shards: Path) -> None:
    train = [json.loads(s["json"]) for s in _samples(sample_shards, "train")]
    first_shard = Counter(t["wnid"] for t in train[:20])
    assert len(first_shard) >= 4, "a 20-sample shard of a shuffled 6-class split holds most classes"
    assert [t["source"] for t in train] != sorted(t["source"] for t in train)
    val = [json.loads(s["json"])["source"] for s in _samples(sample_shards, "val")]
    assert val == sorted(val)


def test_images_are_256_rgb_jpegs(sample_shards: Path) -> None:
    from PIL import Image
    import io
    for s in _samples(sample_shards, "val")[:10]:
        img = Image.open(io.BytesIO(s["jpg"]))
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (256, 256))


def test_tar_tf_and_wds2idx_agree(sample_shards: Path, tmp_path: Path) -> None:
    import shutil
    wds2idx = Path(shutil.which("wds2idx") or Path(__import__("sys").executable).parent / "wds2idx")
    shard = contract.load(sample_shards).splits["train"].shards[0]
    names = subprocess.run(["tar", "-tf", str(shard.tar)], check=True, capture_output=True, text=True).stdout.split()
    assert len(names) == 3 * shard.samples
    assert {n.split(".", 1)[1] for n in names} == {"jpg", "cls", "json"}
    subprocess.run([str(wds2idx), str(shard.tar), str(tmp_path / "ref.idx")], check=True, capture_output=True)
    assert shard.index.read_text() == (tmp_path / "ref.idx").read_text()
    with tarfile.open(shard.tar) as tar:
        assert all(m.isfile() and m.mtime == 0 for m in tar.getmembers())


def test_dali_reads_with_index_files(sample_shards: Path) -> None:
    from nvidia.dali import fn, pipeline_def, types

    m = contract.load(sample_shards)
    shards = m.splits["val"].shards

    @pipeline_def(batch_size=8, num_threads=2, device_id=None)
    def read():
        jpg, cls = fn.readers.webdataset(paths=[str(s.tar) for s in shards], index_paths=[str(s.index) for s in shards],
                                         ext=["jpg", "cls"], missing_component_behavior="error", name="r")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls

    pipe = read()
    pipe.build()
    assert pipe.epoch_size("r") == m.splits["val"].samples
    images, labels = pipe.run()
    assert np.array(images.as_tensor()).shape == (8, 256, 256, 3)
    decoded = [int(bytes(np.array(labels[i])).decode()) for i in range(8)]
    assert decoded == [int(s["cls"]) for s in _samples(sample_shards, "val")[:8]]


def test_manifest_check_fails_early_with_a_hint(sample_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(contract.ManifestError, match="make shards"):
        contract.load(tmp_path)
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(sample_shards, copy)
    victim = contract.load(copy).splits["train"].shards[1].tar
    victim.write_bytes(victim.read_bytes()[:-1024])
    with pytest.raises(contract.ManifestError, match=victim.name):
        contract.load(copy)


def _oversize_src(root: Path) -> Path:
    """Two classes of smooth images (~9 KB each as shards store them) and one of random noise
    (~49 KB), in layout (a)."""
    import io

    from PIL import Image

    def jpeg(pixels: np.ndarray) -> bytes:
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=95)
        return out.getvalue()

    y, x = np.mgrid[0:300, 0:300]
    for split, count in (("train", 5), ("val", 1)):
        for w, wnid in enumerate(("n00000001", "n00000002")):
            for i in range(count):
                smooth = np.stack([(x + 7 * i) % 256, (y + 11 * w) % 256, (x + y) % 256], -1).astype(np.uint8)
                path = root / split / wnid / f"smooth_{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(jpeg(smooth))
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    (root / "train" / "n00000001" / "noise.JPEG").write_bytes(jpeg(noise))
    return root


def test_an_image_past_shard_bytes_gets_a_tar_of_its_own_and_the_run_names_it(tmp_path: Path) -> None:
    """An image whose stored bytes alone pass ``--shard_bytes`` (a tar is never cut inside an
    image) was written in a tar past the limit, and the run said nothing.  Now its tar holds it
    alone, the summary names the image and the tar, ``manifest.json`` lists it under
    ``oversize``, and a resumed run (the journal's shards kept) says it again."""
    from tests.conftest import run_module

    src = _oversize_src(tmp_path / "src")
    out = tmp_path / "out"
    args = ["--src", str(src), "--out", str(out), "--shard_samples", "0", "--shard_bytes", "40000", "--workers", "1"]
    result = run_module("shards", *args, check=False)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "manifest.json").read_text())
    noise = str(src / "train" / "n00000001" / "noise.JPEG")
    [entry] = record["oversize"]
    shard = next(s for s in record["splits"]["train"]["shards"] if s["tar"] == entry["tar"])
    assert entry["path"] == noise and entry["split"] == "train" and 40000 < entry["bytes"] <= shard["bytes"]
    assert shard["samples"] == 1
    with tarfile.open(out / "train" / shard["tar"]) as tar:
        assert json.loads(tar.extractfile(next(m for m in tar if m.name.endswith(".json"))).read())["source"] == \
            "train/n00000001/noise.JPEG"
    assert all(s["bytes"] <= 40000 + 10240 for s in record["splits"]["train"]["shards"] if s is not shard)
    assert len(record["splits"]["train"]["shards"]) > 2  # the smooth images: several tars, none named
    said = (f"  warning: {noise} needs a tar of {entry['bytes']} bytes, past --shard_bytes 40000: it is alone in "
            f"train/{shard['tar']} (a tar is not cut inside an image)")
    assert result.stdout.splitlines().count(said) == 1, result.stdout
    (out / "manifest.json").unlink()  # an unfinished directory: the shards kept from the journal
    again = run_module("shards", *args, check=False)
    assert again.returncode == 0 and said in again.stdout.splitlines(), again.stdout + again.stderr
    assert json.loads((out / "manifest.json").read_text()) == record
