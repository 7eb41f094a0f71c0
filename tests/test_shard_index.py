"""A shard's DALI index is part of the contract: DALI reads a tar only where its index points, so
an index that does not fit the tar (stale, truncated, of another tar) loses samples without a
word or fails inside DALI.  Real sample shards, the real service and the real DALI reader."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import LoaderConfig, _spec
from pipeline.loader import DaliLoader
from service.build import _loader
from service.errors import DataError
from shards import manifest as contract
from shards.index_check import index_entries_defect
from tests.service_proc import run_service

TAR = "train-000000.tar"


@pytest.fixture
def shards(sample_shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(sample_shards, copy)
    return copy


def stale(index: Path, entries: int = 10) -> None:
    """The index as an older tar of ``entries`` samples left it: well-formed, its first entries."""
    lines = index.read_text().splitlines()[1:entries + 1]
    index.write_text(f"v1.2 {entries}\n" + "".join(line + "\n" for line in lines))


def test_a_stale_index_stops_the_start_naming_it_and_the_fix(shards: Path, tmp_path: Path) -> None:
    tar, index = shards / "train" / TAR, shards / "train" / TAR.replace(".tar", ".idx")
    stale(index)
    out = tmp_path / "run"
    rc, service = run_service(shards, out, "--epochs", "1", "--debug.ids", "true", timeout=240)
    # was: exit 0 after training on 134 distinct ids while saying "train: 144 images"
    assert rc == 1, service.stdout + service.stderr
    assert "Traceback" not in service.stderr and len(service.stderr.strip().splitlines()) == 1, service.stderr
    assert f"its index {index} lists 10 sample(s) in its header and has 10 entries where the manifest has 20" \
        in service.stderr
    assert f"wds2idx {tar} {index}" in service.stderr and "make shards" not in service.stderr
    assert not (out / "ids.jsonl").exists() or not (out / "ids.jsonl").read_text().strip()


def _damage(index: Path, how: str) -> str:
    text = index.read_text()
    lines = text.splitlines()
    if how == "empty":
        index.write_text("")
        return "is empty"
    if how == "truncated mid-line":
        index.write_text(text[:len(text) - 40])
        return "ends in a malformed entry"
    if how == "truncated at a line":
        index.write_text("".join(line + "\n" for line in lines[:-3]))
        return "has 17 entries where the manifest has 20"
    if how == "no header":
        index.write_text("".join(line + "\n" for line in lines[1:]))
        return "does not begin with the `v1.2 <samples>` line"
    if how == "of a larger tar":
        fields = lines[-1].split()
        fields[-3] = str(int(fields[-3]) + 10**9)  # the last member's offset, past this tar's end
        index.write_text("\n".join([*lines[:-1], " ".join(fields)]) + "\n")
        return "past the end of the tar"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["empty", "truncated mid-line", "truncated at a line", "no header",
                                 "of a larger tar"])
def test_a_damaged_index_is_named_by_the_manifest_check(shards: Path, how: str) -> None:
    tar, index = shards / "train" / "train-000002.tar", shards / "train" / "train-000002.idx"
    said = _damage(index, how)
    with pytest.raises(contract.ManifestError) as info:
        contract.load(shards)
    message = str(info.value)
    assert message.startswith(f"{tar}: its index {index} ") and said in message, message
    assert message.endswith(f"rewrite it from the tar: wds2idx {tar} {index}")
    wds2idx = shutil.which("wds2idx") or str(Path(sys.executable).parent / "wds2idx")
    subprocess.run([wds2idx, *message.rsplit("wds2idx ", 1)[1].split()], check=True, capture_output=True)
    contract.load(shards)  # the command the message gives is the fix


def test_the_manifests_own_indexes_pass(sample_shards: Path) -> None:
    m = contract.load(sample_shards)
    assert all(contract.index_problem(s, s.bytes) is None for split in m.splits.values() for s in split.shards)
    assert all(index_entries_defect(s.index) is None for split in m.splits.values() for s in split.shards)


@pytest.mark.parametrize("how", ["empty", "no header"])
def test_a_loader_that_fails_on_its_index_is_diagnosed_as_the_index(shards: Path, how: str) -> None:
    """An index damaged after the start's check (DALI opens it when the loader is built): DALI's
    own error names the ``.idx``, and so must the diagnosis, not "every shard matches"."""
    tar, index = shards / "train" / "train-000002.tar", shards / "train" / "train-000002.idx"
    manifest = contract.load(shards)
    spec = _spec(shards, "train", 0, 1, torch.device("cpu"), LoaderConfig(batch_size=24, threads=1), True, 1, False)
    said = _damage(index, how)
    with pytest.raises(DataError) as info:
        _loader(manifest, "train", lambda: DaliLoader(spec, torch.device("cpu")))
    message = str(info.value)
    assert message.startswith(f"train shard {tar}: its index {index} {said}"), message
    assert f"wds2idx {tar} {index}" in message and "the loader failed with: " in message
    assert "elsewhere" not in message and "make shards" not in message


def _damage_entry(index: Path, how: str) -> None:
    """Entry 3 of ``index`` damaged inside, its header and last entry as they were."""
    lines = index.read_text().splitlines()
    fields = lines[3].split()
    if how == "another sample's offset":  # its JPEG read from sample 2's bytes, under its own label
        fields[1:3] = lines[2].split()[1:3]
    else:  # "a JPEG cut short": DALI reads the first part of the JPEG only
        fields[2] = str(int(fields[2]) - 1000)
    lines[3] = " ".join(fields)
    index.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("how", ["another sample's offset", "a JPEG cut short"])
def test_a_damaged_entry_inside_an_index_stops_the_start_naming_it(shards: Path, tmp_path: Path, how: str) -> None:
    """The start's check reads an index's header and last entry only; with an entry inside damaged,
    tar and checksums intact, the run trained to exit 0 on one sample's pixels under another's
    label (or a cut JPEG).  The deep check (the hash) now reads every entry."""
    tar, index = shards / "train" / TAR, shards / "train" / TAR.replace(".tar", ".idx")
    _damage_entry(index, how)
    rc, service = run_service(shards, tmp_path / "run", "--epochs", "1", "--data.verify", "before", timeout=240)
    assert rc == 1, service.stdout + service.stderr
    assert "Traceback" not in service.stderr and len(service.stderr.strip().splitlines()) == 1, service.stderr
    assert f"its index {index} has entry 3 pointing where the tar has no such member" in service.stderr, service.stderr
    assert f"wds2idx {tar} {index}" in service.stderr
    wds2idx = shutil.which("wds2idx") or str(Path(sys.executable).parent / "wds2idx")
    subprocess.run([wds2idx, str(tar), str(index)], check=True, capture_output=True)
    assert contract.shard_problem(contract.load(shards).splits["train"].shards[0]) is None  # the fix it names
