"""``python -m service.predict``: what a trained model says an image is.

    python -m service.predict --run runs/paper [--shards DIR] [--views 10] [--top 5] IMAGE ...

An image is seen exactly as the service's evaluation sees the validation images, so a prediction
here is the one the logged validation error was counted from:

* the shards' preparation (``shards.imaging.prepare``: shorter side to the shards' size, the centre
  square, JPEG at the shards' quality), so a validation image gives the bytes its shard holds;
* the evaluation views (``pipeline.views``: the paper's four corners and centre, each also
  mirrored, or the centre alone) with the training set's mean image subtracted under each view
  (``pipeline.normalize.DeviceNormalizer``, the loaders' own normaliser);
* the softmax averaged over the views (``model.train_step.view_averaged_probs``, evaluation's rule).

What that preparation changed in an image's pixels (alpha flattened, a tiny image blown up, an
animation's first frame alone, an EXIF rotation not applied) ends its line in brackets: it bears on how far to trust the answer.

The class names and the mean image come from the shards the model was trained on.  Their data
fingerprint must be the checkpoint's: another dataset's mean image or class order would give
confident, wrong answers, so a mismatch is one line and exit code 2, not a prediction.
Reading the checkpoint changes nothing in the run directory (unreadable checkpoints are skipped,
not set aside as the service does).

Exit codes: 0 all predicted; 1 an image could not be read (its line on stderr, the rest predicted),
or standard output could not be written (a full disk: one line, the rest not tried); 2 a setting, the
run, its checkpoint or shards refused, or standard output closed; 130 Ctrl-C; 141 the output's reader left.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config_values import at_least_one, path_arg
from common.streams import READER_GONE, silence
from model.train_step import view_averaged_probs
from pipeline.config import LoaderConfig
from pipeline.normalize import DeviceNormalizer
from pipeline.reference import decode
from pipeline.stats import manifest_stats
from pipeline.views import VIEW_COUNTS, view_stack
from service import data_stats
from service.build import alexnet, cuda_problem
from service.checkpoint_trust import file_kind
from service.errors import EXIT_CONFIG, ServiceError
from service.model_settings import ModelSettings, device_name_ok
from service.predict_run import newest_checkpoint, trained_on
from shards import manifest as contract
from shards.imaging import BadImage, Prepared, prepare


@dataclass(frozen=True)
class Prediction:
    image: Path
    top: list[tuple[str, str, float]]  # (wnid, name, probability), most likely first
    changes: tuple[str, ...] = ()  # what the model's input lost or gained (alpha, tiny, a GIF's frames)


class Predictor:
    """A checkpoint's model with its shards' classes and mean image, ready for images."""

    def __init__(self, run: Path, shards: Path | None = None, views: int = 10, device: str = "cpu") -> None:
        self.device = _device(device)  # before the checkpoint: reading one takes seconds
        self.checkpoint, payload = newest_checkpoint(run)
        cfg = payload["config"]
        self.manifest = trained_on(cfg, shards, self.checkpoint, payload["identity"]["data"])
        self.views = views
        known = {f.name for f in dataclasses.fields(ModelSettings)}  # an older checkpoint's missing keys: defaults
        settings = ModelSettings(**{k: v for k, v in cfg["model"].items() if k in known})
        self.model = alexnet(settings, self.manifest.num_classes)  # grouped: the same state dict as the towers
        self.model.load_state_dict(payload["model"])
        self.model.to(self.device).eval()
        loader = LoaderConfig(crop=cfg["loader"]["crop"], normalize=cfg["loader"]["normalize"])
        try:
            stats = manifest_stats(self.manifest)  # not in the data fingerprint: checked on its own
        except contract.ManifestError as exc:
            raise ServiceError(EXIT_CONFIG, f"the mean image of the shards the model was trained on is needed: "
                                            f"{exc}") from None
        if differs := data_stats.difference(payload["identity"].get("data_stats"), data_stats.summary(stats)):
            raise ServiceError(EXIT_CONFIG, f"{self.checkpoint.name}: {data_stats.describe(self.manifest.root, differs)}"
                               ": its images would be normalised otherwise than in training; name the shards it "
                               "trained on with --shards")
        self.normalizer = DeviceNormalizer(stats, loader).to(self.device)
        self.size, self.crop = self.manifest.image_size, loader.crop  # the mean image's: manifest_stats
        self.quality = self.manifest.quality

    def probabilities(self, data: bytes) -> torch.Tensor:
        """The view-averaged softmax (classes,) for one image file's bytes (``BadImage`` if unreadable)."""
        return self._probabilities(self._prepare(data))

    def _prepare(self, data: bytes) -> Prepared:
        """The image as ``make shards`` stored the training images: the same resize and JPEG."""
        return prepare(data, self.size, self.quality)

    @torch.no_grad()
    def _probabilities(self, prepared: Prepared) -> torch.Tensor:
        image = decode(prepared.jpeg)
        crops = torch.from_numpy(np.ascontiguousarray(view_stack(image, self.crop, self.views, flip=False)))
        # The normaliser takes 1 view as (N, h, w, 3), V views as (N, V, h, w, 3): view_stack's
        # (V, h, w, 3) is one image's V views, or with V = 1 already a batch of one image.
        batch = self.normalizer.views(crops if self.views == 1 else crops[None], self.views)
        return view_averaged_probs(self.model, batch.to(self.device))[0].cpu()

    def predict(self, path: Path, top: int = 5) -> Prediction:
        """``path``'s top classes; ``OSError`` if it cannot be read, ``BadImage`` if it is no image
        (or no regular file: a FIFO's read would block until a writer comes, for ever)."""
        _regular_file(path)
        prepared = self._prepare(path.read_bytes())
        probs = self._probabilities(prepared)
        values, indices = probs.topk(min(top, probs.numel()))
        return Prediction(path, [(self.manifest.classes[i], self.manifest.names[i], float(v))
                                 for v, i in zip(values.tolist(), indices.tolist())], prepared.changes)


def _regular_file(path: Path) -> None:
    """``BadImage`` naming what ``path`` is when it is no regular file (after symbolic links); seen
    by ``stat`` before any open, so a FIFO is never opened."""
    mode = path.stat().st_mode  # OSError: missing, unreadable directory on the way, a symlink loop
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise BadImage(f"a directory, not an image file; give the images in it (e.g. {path}/*.jpg)")
    kind = file_kind(mode, "not a regular file")
    raise BadImage(f"{kind}, not an image file; it was not read")


def _device(name: str) -> torch.device:
    """``--device`` as a torch device that is there, or one line (exit 2) saying why not."""
    if not device_name_ok(name, auto=False):
        raise ServiceError(EXIT_CONFIG, f"--device {name}: must be cpu, cuda or cuda:N; use --device cpu if unsure")
    device = torch.device(name)
    if problem := cuda_problem(device):
        raise ServiceError(EXIT_CONFIG, f"--device {name}: {problem}; use --device cpu"
                           + (" or a visible one" if torch.cuda.is_available() else ""))
    return device


def _line(p: Prediction) -> str:
    """One image's line; what was changed in its pixels in brackets at the end, as it bears on the answer."""
    changes = f"  [{'; '.join(p.changes)}]" if p.changes else ""
    return f"{p.image}: " + "  ".join(f"{wnid} {name} {100 * prob:.1f}%" for wnid, name, prob in p.top) + changes


def _json(p: Prediction) -> str:
    return json.dumps({"image": str(p.image), "top": [{"wnid": w, "name": n, "probability": round(v, 6)}
                                                      for w, n, v in p.top], "changes": list(p.changes)})


class OutputLost(Exception):
    """Standard output could not take a prediction (a full disk, an I/O error): not the image's fault."""


def _emit(text: str) -> None:
    """Print one prediction, a failed write as ``OutputLost`` (``BrokenPipeError``, the reader gone, as it is)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputLost(exc.strerror or str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=path_arg,
                        help="image files (JPEG, PNG, ... anything make shards reads)")
    parser.add_argument("--run", type=path_arg, required=True,
                        help="a run directory (its newest checkpoint) or a checkpoint")
    parser.add_argument("--shards", type=path_arg, help="the shards it was trained on (default: the path in its config)")
    parser.add_argument("--views", type=int, choices=VIEW_COUNTS, default=10, help="10: the paper's views; 1: the centre")
    parser.add_argument("--top", type=at_least_one("the number of classes to show per image"), default=5,
                        help="classes to show per image (at least 1; more than the model's classes shows them all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--json", action="store_true", help="one JSON object per image instead of a line")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if sys.stdout is None:  # started with it closed (>&-): print would drop every answer, exit 0
        print("predict: standard output is closed: the predictions would be lost; send them to a file (> FILE)",
              file=sys.stderr)
        return EXIT_CONFIG
    done = failed = 0
    try:
        try:
            predictor = Predictor(args.run, args.shards, args.views, args.device)
        except ServiceError as exc:
            print(f"predict: {exc}", file=sys.stderr)
            return exc.code
        for path in args.images:
            try:
                p = predictor.predict(path, args.top)
            except (OSError, BadImage) as exc:
                failed += 1
                print(f"predict: {path}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}",
                      file=sys.stderr)
            else:
                _emit(_json(p) if args.json else _line(p))
            done += 1
    except KeyboardInterrupt:  # Ctrl-C: what was printed stands; nothing to clean up
        print(f"predict: interrupted after {done} of {len(args.images)} images", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): end quietly, as a SIGPIPE would
        silence(sys.stdout.fileno())
        return READER_GONE
    except OutputLost as exc:  # after the rest of the output, already buffered, is dropped
        silence(sys.stdout.fileno())
        print(f"predict: cannot write the predictions ({exc}) after {done} of {len(args.images)} images; free space "
              "or write them elsewhere", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
