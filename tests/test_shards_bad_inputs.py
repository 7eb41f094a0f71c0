"""A corpus of bad and quirky inputs: each ends where it should, and the totals balance."""
from __future__ import annotations

import io
import json
import resource
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.build import build
from shards.config import ShardConfig
from tests.conftest import run_module

A, B = "n00000001", "n00000002"


def _jpeg(size: tuple[int, int] = (300, 200), mode: str = "RGB", seed: int = 0, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    (rgb if mode == "RGB" else rgb.convert(mode)).save(buf, fmt)
    return buf.getvalue()


def _png16() -> bytes:
    a = (np.arange(300 * 200, dtype=np.uint32).reshape(200, 300) * 3 % 65536).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _alpha(mode: str) -> bytes:
    rgba = Image.new("RGBA", (300, 280), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 150, 280))
    buf = io.BytesIO()
    (rgba if mode == "RGBA" else rgba.convert("P")).save(buf, "PNG")
    return buf.getvalue()


# file name -> (bytes, where it must end up: written / converted / skipped / ignored)
CORPUS: dict[str, tuple[bytes, str]] = {
    f"train/{A}/good_1.JPEG": (_jpeg(seed=1), "written"),
    f"train/{A}/good_2.JPEG": (_jpeg(seed=2), "written"),
    f"train/{A}/zero.JPEG": (b"", "skipped:empty file"),
    f"train/{A}/truncated.JPEG": (_jpeg(seed=3)[:2000], "skipped:truncated"),
    f"train/{A}/random.JPEG": (np.random.default_rng(4).bytes(5000), "skipped:not an image"),
    f"train/{A}/cmyk.JPEG": (_jpeg(mode="CMYK", seed=5), "converted:CMYK"),
    f"train/{A}/png.JPEG": (_jpeg(seed=6, fmt="PNG"), "converted:PNG file"),
    f"train/{B}/gray.JPEG": (_jpeg(mode="L", seed=7), "converted:grayscale"),
    f"train/{B}/sixteen.JPEG": (_png16(), "converted:I;16"),
    f"train/{B}/rgba.JPEG": (_alpha("RGBA"), "converted:RGBA with alpha flattened onto white"),
    f"train/{B}/palette.JPEG": (_alpha("P"), "converted:P with alpha flattened onto white"),
    f"train/{B}/tiny.JPEG": (_jpeg(size=(10, 10), seed=8), "converted:tiny image upscaled from 10x10"),
    f"train/{B}/huge.JPEG": (_jpeg(size=(6000, 4000), seed=9), "written"),
    f"train/{B}/.DS_Store": (b"\x00\x00\x00\x01Bud1", "ignored"),
    f"train/{B}/._huge.JPEG": (b"\x00\x05\x16\x07", "ignored"),
    f"val/{A}/v1.JPEG": (_jpeg(seed=10), "written"),
    f"val/{B}/v2.JPEG": (_jpeg(seed=11), "written"),
    "val/n09999999/unknown.JPEG": (_jpeg(seed=12), "skipped:unknown class"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    for name, (data, _) in CORPUS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _where(record: dict, root: Path) -> dict[str, str]:
    """Every input path -> its fate as recorded in the manifest."""
    fates = {}
    for kind in ("converted", "skipped"):
        for item in record[kind]:
            fates[str(Path(item["path"]).relative_to(root))] = f"{kind}:{item['reason']}"
    for item in record["ignored"]:
        fates[str(Path(item).relative_to(root))] = "ignored"
    return fates


def test_every_bad_input_ends_where_it_should(corpus: Path, tmp_path: Path) -> None:
    record = build(ShardConfig(src=corpus, out=tmp_path, workers=2, max_skipped_fraction=0.5).validate())
    fates = _where(record, corpus)
    for name, (_, expected) in CORPUS.items():
        got = fates.get(name, "written")
        kind, _, reason = expected.partition(":")
        assert got.split(":")[0] == kind and reason in got, f"{name}: expected {expected}, got {got}"
    images = [n for n, (_, fate) in CORPUS.items() if fate != "ignored"]
    assert record["inputs"] == len(images) == record["written"] + len(record["skipped"])
    assert record["written"] == sum(1 for n in images if not CORPUS[n][1].startswith("skipped"))
    assert record["splits"]["train"]["class_counts"] == [4, 6] and record["splits"]["val"]["class_counts"] == [1, 1]


def test_too_many_skipped_fails_with_the_reason(corpus: Path, tmp_path: Path) -> None:
    result = run_module("shards", "--src", str(corpus), "--out", str(tmp_path), "--max_skipped_fraction", "0.1",
                        check=False)
    assert result.returncode == 1
    assert "4 of 16 inputs" in result.stderr and "max_skipped_fraction" in result.stderr
    assert not (tmp_path / "manifest.json").exists()
    skipped = json.loads((tmp_path / "skipped.json").read_text())
    assert {Path(s["path"]).name for s in skipped} == {"zero.JPEG", "truncated.JPEG", "random.JPEG", "unknown.JPEG"}


def test_unsafe_tar_members_are_rejected_and_accounted(tmp_path: Path) -> None:
    """Layout (d): '..', absolute, link and device members are never read, and are listed as skipped."""
    from tests.layout_fixtures import evil_members, make_d

    root = tmp_path / "d"
    expected = make_d(root, inner_extra=evil_members())
    record = build(ShardConfig(src=root, out=tmp_path / "out", workers=1, max_skipped_fraction=0.9).validate())
    rejected = {Path(s["path"].split(":")[-1]).name: s["reason"] for s in record["skipped"] if "never read" in s["reason"]}
    assert set(rejected) == {"evil.JPEG", "x.JPEG", "link.JPEG", "hard.JPEG", "pipe.JPEG"}
    assert ".." in rejected["evil.JPEG"]
    assert record["written"] == len(expected)
    assert record["inputs"] == record["written"] + len(record["skipped"])


def test_config_rejects_unknown_keys_and_bad_types(tmp_path: Path) -> None:
    bad_key = run_module("shards", "--src", str(tmp_path), "--qualty", "80", check=False)
    assert bad_key.returncode == 2 and "unknown key 'qualty'" in bad_key.stderr
    bad_type = run_module("shards", "--src", str(tmp_path), "--quality", "high", check=False)
    assert bad_type.returncode == 2 and "quality must be int" in bad_type.stderr
    no_layout = run_module("shards", "--src", str(tmp_path), "--out", str(tmp_path / "o"), check=False)
    assert no_layout.returncode == 1 and "train" in no_layout.stderr


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_transparent_pixels_become_white(mode: str) -> None:
    from shards.imaging import prepare

    out = np.asarray(Image.open(io.BytesIO(prepare(_alpha(mode)).jpeg)), dtype=np.int16)
    assert out.shape == (256, 256, 3)
    # Left half opaque blue, right half fully transparent red -> white (centre crop keeps both).
    assert np.abs(out[128, 20] - [0, 0, 255]).max() < 8
    assert np.abs(out[128, 235] - [255, 255, 255]).max() < 8


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    from shards.imaging import prepare

    a = np.linspace(0, 65535, 300 * 280).reshape(280, 300).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    out = np.asarray(Image.open(io.BytesIO(prepare(buf.getvalue()).jpeg)), dtype=np.float64)
    # The full 16-bit range maps onto 0..255: dark at the top, bright at the bottom, not all white.
    assert out[2].mean() < 40 and out[-3].mean() > 215


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_an_animation_is_its_first_frame_and_says_so(fmt: str) -> None:
    """An animated GIF or PNG became its first frame with only 'GIF file re-encoded' noted: the
    manifest (and predict) now say the other frames were left out."""
    from shards.imaging import prepare

    frames = [Image.new("RGB", (300, 300), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    prepared = prepare(buf.getvalue())
    assert "first of 3 frames used" in prepared.changes and prepared.note.startswith(f"{fmt} file re-encoded as JPEG")
    red = np.asarray(Image.open(io.BytesIO(prepared.jpeg)), dtype=np.int16).reshape(-1, 3).mean(axis=0)
    assert red[0] > 250 and red[1] < 5 and red[2] < 5, red


def test_a_multi_page_tiff_cut_short_after_its_first_page_is_that_page() -> None:
    """Counting the pages of a TIFF cut short raised TypeError ('Missing dimensions') out of the
    worker, and left the decoded image unconvertible; its first page is whole and is used."""
    from shards.imaging import prepare

    rng = np.random.default_rng(0)
    pages = [Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)) for _ in range(3)]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    prepared = prepare(buf.getvalue()[:int(len(buf.getvalue()) * 0.45)])
    assert prepared.changes == ("first frame used, the rest unreadable",)


def test_a_negative_seed_is_one_line_and_exit_2(sample_src: Path, tmp_path: Path) -> None:
    """The training split's shuffle takes seeds >= 0: -1 was numpy's "expected non-negative integer"
    traceback, after the scan of the source tree."""
    out = tmp_path / "out"
    result = run_module("shards", "--src", str(sample_src), "--out", str(out), "--seed", "-1", check=False)
    assert (result.returncode, result.stderr) == (2, "shards: seed must be at least 0, got -1\n")
    assert not out.exists()


def _few_files() -> None:
    """A child's open-file limit of 64: should the sharder start forking its workers anyway, it
    stops at a few dozen (one pipe each), not at the number asked for."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def test_more_workers_than_any_machine_has_cores_is_one_line_and_exit_2(sample_src: Path, tmp_path: Path) -> None:
    """``--workers 100000`` forked a process per worker until the open files ran out, then said
    "[Errno 24] Too many open files (writing to OUT)": a disk problem, it seemed, not the setting."""
    out = tmp_path / "out"
    result = run_module("shards", "--src", str(sample_src), "--out", str(out), "--workers", "100000", check=False,
                        preexec_fn=_few_files)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("shards: workers must be in 0..1024 (0 = one per core; more processes than cores only "
                             "contend), got 100000\n")
    assert not out.exists()


def _little_memory() -> None:
    """A child's address space of 4 GiB: should the sharder start resizing to the size asked for,
    it fails at once rather than take the machine's memory (and the OOM killer's attention)."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_a_size_no_image_needs_is_one_line_and_exit_2(sample_src: Path, tmp_path: Path) -> None:
    """``--size 100000`` (a 30 GB image each) scanned the source, then had its workers killed by the
    OOM killer half a minute later, with the machine's memory gone meanwhile."""
    out = tmp_path / "out"
    result = run_module("shards", "--src", str(sample_src), "--out", str(out), "--size", "100000", check=False,
                        preexec_fn=_little_memory)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "shards: size must be 32..4096, got 100000\n"
    assert not out.exists()


@pytest.mark.parametrize("labels", ["labels.txt", "missing.txt"])
def test_val_labels_on_a_tree_labelled_by_folders_is_one_line_and_exit_2(tmp_path: Path, labels: str) -> None:
    """``--val_labels`` on layout (a), whose val images are labelled by their class folders, ended
    as the source tree's problem (exit 1, "shards: error: ..."): it is the setting's (exit 2)."""
    from tests.layout_fixtures import make_a, write

    make_a(tmp_path / "src")
    write(tmp_path / "labels.txt", b"ILSVRC2012_val_00000001.JPEG n01000001\n")
    out = tmp_path / "out"
    result = run_module("shards", "--src", str(tmp_path / "src"), "--out", str(out),
                        "--val_labels", str(tmp_path / labels), check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"shards: val_labels {tmp_path / labels}: ") and result.stderr.count("\n") == 1
    assert "drop --val_labels" in result.stderr, result.stderr
    assert not out.exists()


def test_val_labels_naming_no_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A layout (b) tree with ``--val_labels`` naming no file listed every layout as missing
    (several lines, exit 1): the file the setting names is what is missing."""
    from tests.layout_fixtures import make_b

    make_b(tmp_path / "src", ["ILSVRC2012_val_00000001.JPEG n01000001"], label_path="labels/val.txt")
    out = tmp_path / "out"
    result = run_module("shards", "--src", str(tmp_path / "src"), "--out", str(out),
                        "--val_labels", str(tmp_path / "nope.txt"), check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"shards: val_labels {tmp_path / 'nope.txt'}: no such file: give the flat val/ "
                             "directory's label file (<file> <wnid or class index> per line)\n")
    assert not out.exists()


@pytest.mark.parametrize("shard_samples", ["0", "5000"])
def test_shard_bytes_below_one_image_is_one_line_and_exit_2(tmp_path: Path, shard_samples: str) -> None:
    """``--shard_bytes 100`` (bytes meant as MB, say) was taken: every tar held one image, each
    ~200 times the limit, and the run said nothing (rc 0; ImageNet would be 1.3 million tars)."""
    from tests.layout_fixtures import make_a

    make_a(tmp_path / "src")
    out = tmp_path / "out"
    result = run_module("shards", "--src", str(tmp_path / "src"), "--out", str(out), "--shard_bytes", "100",
                        "--shard_samples", shard_samples, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("shards: shard_bytes 100 is less than one 256x256 image as planned (32768 bytes): "
                             "every tar would hold one image, over the limit; give a tar's limit in bytes, at least "
                             "32768 (1000000000: 1 GB), or 0 for none\n")
    assert not out.exists()
