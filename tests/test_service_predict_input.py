"""``python -m service.predict`` against awkward input and a hostile environment: each documented
option works, and a bad setting or file is one line naming it (no traceback), never a hang.
A run is faked cheaply (an untrained model's checkpoint on the sample shards): what is checked here
is the command, not what the model learnt (``tests/test_service_predict.py`` trains one)."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.train_step import view_averaged_probs
from pipeline import LoaderConfig, build_eval_loader
from service import checkpoint as ckpt
from service.build import alexnet
from service.checkpoint_crc import checksum
from service.model_settings import ModelSettings
from service.predict import Predictor
from service.state import data_fingerprint
from shards import manifest as contract
from tests.test_service_predict import val_samples

ROOT = Path(__file__).resolve().parents[1]


def fake_run(out: Path, shards: Path, recorded: str | None = None, recorded_out: str | None = None) -> Path:
    """``out`` holding one checkpoint of an untrained model on ``shards``; its config names the
    shards and the run directory as ``recorded`` and ``recorded_out`` (the paths given to the service)."""
    out.mkdir(parents=True)
    manifest = contract.load(shards, splits=("train",))
    torch.manual_seed(0)
    settings = ModelSettings(bias_init=0.1)
    payload = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "run_id": "r",
               "config": {"shards": recorded or str(shards), "out": recorded_out or str(out),
                          "model": dataclasses.asdict(settings), "loader": {"crop": 224, "normalize": "mean_image"}},
               "identity": {"data": data_fingerprint(manifest.record)}, "progress": {"step": 1},
               "model": alexnet(settings, manifest.num_classes).state_dict(), "velocity": {}, "schedule": {},
               "loaders": [], "rng": [], "lr_scale": 1.0}
    payload["crc32"] = checksum(payload)
    ckpt.atomic_save(payload, ckpt.path_for(out, 1))
    return out


@pytest.fixture(scope="module")
def run(sample_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding one checkpoint of an untrained model on ``sample_shards``."""
    return fake_run(tmp_path_factory.mktemp("predict-input") / "run", sample_shards)


@pytest.fixture(scope="module")
def image(sample_src: Path) -> Path:
    return next((sample_src / "val").rglob("*.JPEG"))


def predict(*args: str | Path, timeout: float = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.predict", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_one_view_is_the_centre_crop_the_evaluation_counts(run: Path, sample_shards: Path, sample_src: Path,
                                                           image: Path) -> None:
    """``--views 1`` (documented: the centre crop alone) predicts, and its probabilities are the
    1-view evaluation's for the same validation sample."""
    done = predict("--run", run, "--views", "1", "--top", "2", image)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith(f"{image}: ") and done.stdout.count("%") == 2
    predictor = Predictor(run, views=1)
    loader = build_eval_loader(sample_shards, config=LoaderConfig(batch_size=4, threads=2), views=1, ids=True)
    images, _, ids = next(iter(loader))
    with torch.no_grad():
        expected = view_averaged_probs(predictor.model.eval(), images)
    samples = val_samples(sample_shards)
    for i, ident in enumerate(ids.tolist()):
        _, source = samples[ident]
        source = source if source.is_absolute() else sample_src / source
        torch.testing.assert_close(predictor.probabilities(source.read_bytes()), expected[i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("top", ["0", "-1"])
def test_top_below_one_is_refused_naming_the_flag(run: Path, image: Path, top: str) -> None:
    """``--top 0`` printed an image name with no classes (exit 0), ``--top -1`` a torch traceback."""
    done = predict("--run", run, "--top", top, image)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == (f"python -m service.predict: error: argument --top: must be at least 1 "
                                            f"(the number of classes to show per image), got {top}")


def test_top_above_the_class_count_shows_every_class(run: Path, image: Path) -> None:
    done = predict("--run", run, "--top", "1000", image)
    assert done.returncode == 0 and done.stdout.count("%") == 6, done.stderr  # the sample shards' 6 classes


@pytest.mark.parametrize("device", ["bogus", "meta", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_a_device_that_is_not_there_is_one_line(run: Path, image: Path, device: str) -> None:
    """A misspelt or absent --device was a torch traceback (exit 1), after the checkpoint was read."""
    done = predict("--run", run, "--device", device, image)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"predict: --device {device}: ") and "--device cpu" in line, line


def test_a_fifo_or_a_directory_given_as_an_image_is_one_line_not_a_hang(run: Path, image: Path, tmp_path: Path) -> None:
    """A FIFO named x.jpg blocked the command for ever (read_bytes waits for a writer) and the
    images after it were never predicted; a directory said only "Is a directory"."""
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    folder = tmp_path / "photos"
    folder.mkdir()
    done = predict("--run", run, "--top", "1", fifo, folder, image, timeout=60)
    assert done.returncode == 1 and done.stdout.startswith(f"{image}: "), done.stderr
    fifo_line, folder_line = done.stderr.splitlines()
    assert fifo_line == f"predict: {fifo}: a FIFO (named pipe), not an image file; it was not read"
    assert folder_line == (f"predict: {folder}: a directory, not an image file; give the images in it "
                           f"(e.g. {folder}/*.jpg)")


def _start(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.predict", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_is_one_line_and_exit_130(run: Path, image: Path) -> None:
    """Ctrl-C (SIGINT) mid-way was a KeyboardInterrupt traceback."""
    proc = _start("--run", run, "--top", "1", *[image] * 200)
    try:
        first = proc.stdout.readline()  # past the checkpoint: predicting
        assert first.startswith(f"{image}: ")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    (line,) = err.splitlines()
    assert line.startswith("predict: interrupted after ") and line.endswith(" of 200 images"), line


def test_a_closed_pipe_ends_it_quietly(run: Path, image: Path) -> None:
    """``predict ... | head -1``: the first write after head exits was a BrokenPipeError traceback."""
    proc = _start("--run", run, "--top", "1", *[image] * 50)
    try:
        assert proc.stdout.readline().startswith(f"{image}: ")
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert err == "" and proc.returncode == 128 + signal.SIGPIPE, (proc.returncode, err)


@pytest.mark.parametrize("output", ["full", "closed"])
def test_output_that_cannot_be_written_is_one_line_not_lost(output: str, run: Path, image: Path) -> None:
    """``predict ... > preds.txt`` on a full disk (here /dev/full) was an OSError traceback; with
    standard output closed (``>&-``) nothing was printed and the exit code was 0, every answer lost."""
    redirect = ">/dev/full" if output == "full" else ">&-"
    done = subprocess.run(["bash", "-c", f'exec "$@" {redirect}', "-", sys.executable, "-m", "service.predict",
                           "--run", str(run), "--top", "1", str(image), str(image)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == (1 if output == "full" else 2) and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.splitlines()
    said = "cannot write the predictions (No space left on device)" if output == "full" else "standard output is closed"
    assert line.startswith(f"predict: {said}"), line


def test_a_checkpoint_of_another_version_is_refused_with_advice_for_predict(image: Path, tmp_path: Path) -> None:
    """The refusal was the training service's: 'use another --out directory, or start over here with
    --fresh true (deletes ...'s checkpoints and logs)', flags predict does not have, one destructive."""
    path = ckpt.path_for(tmp_path, 5)
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION + 1}, path)
    for where in (tmp_path, path):
        done = predict("--run", where, image)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"predict: {path} has checkpoint format version {ckpt.VERSION + 1}; "), line
        assert "--fresh" not in line and "--out" not in line and line.endswith(
            "Predict with the newer version of the code that wrote it, or name another checkpoint with --run"), line


def test_a_webp_image_without_a_webp_decoder_says_so_in_one_line(run: Path, tmp_path: Path) -> None:
    """The project's Pillow-SIMD is built without libwebp: a WebP photo was 'not an image (no decoder
    recognises the bytes)' after two lines of Pillow's UserWarning."""
    from PIL import features
    if features.check("webp"):
        pytest.skip("this Pillow decodes WebP")
    webp = tmp_path / "photo.webp"
    webp.write_bytes(b"RIFF" + (30).to_bytes(4, "little") + b"WEBPVP8L" + bytes(22))
    done = predict("--run", run, webp)
    assert done.returncode == 1 and done.stdout == "", done.stderr
    (line,) = done.stderr.splitlines()
    assert line == (f"predict: {webp}: a WebP image, which this Pillow build cannot decode (built without libwebp); "
                    "convert it to JPEG or PNG"), line


def test_what_the_preparation_changed_in_an_image_ends_its_line(run: Path, image: Path, tmp_path: Path) -> None:
    """A tiny transparent PNG was flattened onto white and blown up 13x, silently: its answer looked
    as trustworthy as a photo's. The changes now end its line (``changes`` in JSON); a plain JPEG has none."""
    from PIL import Image

    tiny = tmp_path / "icon.png"
    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(tiny)
    done = predict("--run", run, "--top", "1", tiny, image)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    icon, photo = done.stdout.splitlines()
    assert icon.startswith(f"{tiny}: ") and icon.endswith(
        "%  [RGBA with alpha flattened onto white; tiny image upscaled from 20x20]"), icon
    assert photo.startswith(f"{image}: ") and photo.endswith("%"), photo
    as_json = predict("--run", run, "--json", tiny, image)
    changes = [json.loads(line)["changes"] for line in as_json.stdout.splitlines()]
    assert changes == [["RGBA with alpha flattened onto white", "tiny image upscaled from 20x20"], []], as_json.stderr


def test_a_photo_whose_exif_says_rotate_says_it_was_seen_as_stored(run: Path, tmp_path: Path) -> None:
    """A phone's portrait photo is stored on its side with EXIF orientation 6; the model was given
    it on its side (as make shards stores such a file), and nothing on its line said so."""
    from PIL import Image

    phone = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (400, 300), (10, 120, 30)).save(phone, exif=exif)
    done = predict("--run", run, "--top", "1", phone)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.rstrip().endswith("%  [EXIF orientation 6 not applied: seen on its side, as stored]"), done.stdout


def test_a_run_trained_with_relative_paths_finds_its_shards_from_elsewhere(sample_shards: Path, image: Path,
                                                                           tmp_path: Path) -> None:
    """``make demo`` records shards = "data/shards" and out = "runs/demo", relative to where training
    started.  From any other directory those shards were looked for under it, and the advice was to
    re-shard ImageNet there (`make shards ... OUT=<cwd>/data/shards`)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shards").symlink_to(sample_shards)
    run = fake_run(tmp_path / "runs" / "demo", sample_shards, "data/shards", "runs/demo")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = predict("--run", run, "--top", "1", image, cwd=elsewhere)
    assert done.returncode == 0 and done.stdout.startswith(f"{image}: "), done.stderr
    (tmp_path / "data" / "shards").unlink()
    done = predict("--run", run, "--top", "1", image, cwd=elsewhere)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.splitlines()
    assert line == (f"predict: the shards the model was trained on are needed for its classes and mean image: its "
                    f"config names data/shards, relative to the directory training started in ({tmp_path}), and "
                    f"{tmp_path / 'data' / 'shards'} has no manifest.json; name them with --shards"), line


def test_a_file_that_is_no_checkpoint_at_all_is_named_as_such(image: Path, tmp_path: Path) -> None:
    """--run given a JPEG said 'it names Python objects ... as loading it could run code', an empty
    file 'EOFError: ' (nothing after the colon)."""
    empty = tmp_path / "checkpoint.pt"
    empty.touch()
    for path, why in ((image, "not a torch.save archive (a checkpoint is a zip file)"),
                      (empty, "empty file (0 bytes)")):
        done = predict("--run", path, image)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert done.stderr == f"predict: --run {path}: not a readable checkpoint: {why}\n", done.stderr


def test_a_run_path_that_is_no_file_nor_directory_says_what_it_is(image: Path, tmp_path: Path) -> None:
    """--run given a FIFO or a symbolic link loop said 'no such run directory or checkpoint file'."""
    fifo = tmp_path / "run.pt"
    os.mkfifo(fifo)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for path, what in ((fifo, "is a FIFO (named pipe), not a regular file"), (tmp_path / "a", "cannot be read")):
        done = predict("--run", path, image, timeout=60)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"predict: checkpoint {path} {what}") and "no such" not in line, line


def test_a_run_with_only_damaged_or_unfinished_checkpoints_is_not_told_to_train_first(tmp_path: Path) -> None:
    """Every checkpoint-*.pt damaged, or only a temporary file being written (a run training its
    first epoch now, or a crash while writing): the advice was "train first"."""
    from service.errors import ServiceError
    from service.predict import newest_checkpoint

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    ckpt.path_for(damaged, 4).write_bytes(b"not a zip")
    writing = tmp_path / "writing"
    writing.mkdir()
    (writing / ".checkpoint-000000004.pt.123.tmp").write_bytes(b"half")
    for run, said in ((damaged, "none of its 1 checkpoint(s) can be read (checkpoint-000000004.pt: not a torch.save "
                                "archive (a checkpoint is a zip file)): restore one from a copy, or name another "
                                "checkpoint with --run"),
                      (writing, "no checkpoint-*.pt in it yet, only .checkpoint-000000004.pt.123.tmp: a checkpoint "
                                "being written (wait for it), or a write a crash cut short")):
        with pytest.raises(ServiceError) as caught:
            newest_checkpoint(run)
        assert caught.value.code == 2 and str(caught.value) == f"--run {run}: {said}", str(caught.value)
        assert "train first" not in str(caught.value)
