"""``python -m service.predict``: a trained run's predictions are the ones its evaluation counted,
and bad input (other shards, an unreadable image, no checkpoint) is one line each."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from model.train_step import view_averaged_probs
from pipeline import LoaderConfig, build_eval_loader
from pipeline.reference import key_number
from service.predict import Predictor
from shards import manifest as contract
from shards.imaging import prepare
from tests.service_proc import run_service

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(sample_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch run on the sample shards (its epoch-end checkpoint)."""
    out = tmp_path_factory.mktemp("predict") / "run"
    rc, service = run_service(sample_shards, out, "--epochs", "1")
    assert rc == 0, service.stderr
    return out


def predict(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.predict", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def val_samples(shards: Path) -> dict[int, tuple[bytes, Path]]:
    """Per sample id: the JPEG its val shard holds and the source image it was made from."""
    found = {}
    for shard in contract.load(shards).splits["val"].shards:
        with tarfile.open(shard.tar) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in files.items():
            if name.endswith(".jpg"):
                key = name[:-4]
                found[key_number(key)] = (data, Path(json.loads(files[key + ".json"])["source"]))
    return found


@pytest.mark.slow
def test_a_prediction_is_what_the_evaluation_counted(trained: Path, sample_shards: Path, sample_src: Path) -> None:
    """For validation images: predict reads the source file and makes the very bytes the shard
    holds, and its 10-view probabilities are the service's evaluation path's (the DALI loader,
    its normaliser, the view-averaged softmax) for that sample."""
    predictor = Predictor(trained)
    samples = val_samples(sample_shards)
    loader = build_eval_loader(sample_shards, config=LoaderConfig(batch_size=16, threads=2), views=10, ids=True)
    images, _, ids = next(iter(loader))
    with torch.no_grad():
        expected = view_averaged_probs(predictor.model.eval(), images)
    for i, ident in enumerate(ids.tolist()[:6]):
        held, source = samples[ident]
        source = source if source.is_absolute() else sample_src / source
        assert prepare(source.read_bytes(), predictor.size, predictor.quality).jpeg == held
        got = predictor.probabilities(source.read_bytes())
        torch.testing.assert_close(got, expected[i], rtol=0, atol=1e-5)
        assert got.topk(5).indices.tolist() == expected[i].topk(5).indices.tolist()


@pytest.mark.slow
def test_the_command_prints_the_top_classes_and_names_what_it_cannot_read(trained: Path, sample_src: Path,
                                                                          tmp_path: Path) -> None:
    image = next((sample_src / "val").rglob("*.JPEG"))
    broken = tmp_path / "notes.JPEG"
    broken.write_text("not an image")
    run = predict("--run", trained, "--top", "3", "--json", image, broken, tmp_path / "missing.jpg")
    assert run.returncode == 1
    (line,) = run.stdout.splitlines()
    record = json.loads(line)
    assert record["image"] == str(image) and len(record["top"]) == 3
    probs = [t["probability"] for t in record["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert all(t["wnid"].startswith("n") and t["name"] for t in record["top"])
    errors = run.stderr.splitlines()
    assert len(errors) == 2 and errors[0].startswith(f"predict: {broken}: ") and errors[1] == (
        f"predict: {tmp_path / 'missing.jpg'}: No such file or directory")


@pytest.mark.slow
def test_other_shards_or_no_checkpoint_are_refused_in_one_line(trained: Path, sample_shards: Path,
                                                               tmp_path: Path) -> None:
    image = tmp_path / "any.jpg"  # not read: the refusal comes first
    other = tmp_path / "other-shards"
    shutil.copytree(sample_shards, other)
    record = json.loads((other / "manifest.json").read_text())
    record["splits"]["train"]["shards"][0]["sha256"] = "0" * 64  # other data: another fingerprint
    (other / "manifest.json").write_text(json.dumps(record))
    run = predict("--run", trained, "--shards", other, image)
    assert run.returncode == 2 and run.stdout == ""
    (line,) = run.stderr.splitlines()
    assert line.startswith(f"predict: {other} are not the shards checkpoint-") and "--shards" in line
    other = tmp_path / "same-shards"  # the same data, its mean image cut short by an interrupted copy
    shutil.copytree(sample_shards, other)
    mean = other / "mean_image.npy"
    mean.write_bytes(mean.read_bytes()[:1000])
    run = predict("--run", trained, "--shards", other, image)
    assert run.returncode == 2 and run.stdout == "" and "Traceback" not in run.stderr, run.stderr
    (line,) = run.stderr.splitlines()
    assert f"{mean} cannot be read as the mean image" in line and "re-run the sharding" in line, line
    other = tmp_path / "resized-shards"  # the same data, its manifest edited to another image size
    shutil.copytree(sample_shards, other)
    record = json.loads((other / "manifest.json").read_text())
    record["parameters"]["size"] = 512  # was: images made 512 px and cropped where the 256 px mean image is not
    (other / "manifest.json").write_text(json.dumps(record))
    run = predict("--run", trained, "--shards", other, image)
    assert run.returncode == 2 and run.stdout == "", run.stderr
    (line,) = run.stderr.splitlines()
    assert "manifest.json: parameters.size 512 is not the 256x256 of the images' mean image" in line, line
    empty = tmp_path / "empty-run"
    empty.mkdir()
    run = predict("--run", empty, image)
    assert run.returncode == 2 and run.stderr == (f"predict: --run {empty}: no readable checkpoint-*.pt in it: "
                                                  "train first (python -m service --out ...) or name a checkpoint file\n")


@pytest.mark.parametrize("args", [["image.jpg", "--run", ""], ["image.jpg", "--run", "run", "--shards="], [""]])
def test_an_empty_path_is_refused_not_read_as_the_working_directory(args: list[str],
                                                                    capsys: pytest.CaptureFixture) -> None:
    from service.predict import main
    with pytest.raises(SystemExit) as info:
        main(args + (["--run", "run"] if args == [""] else []))
    assert info.value.code == 2 and "path is empty: give a path" in capsys.readouterr().err
