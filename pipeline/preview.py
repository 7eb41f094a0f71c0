"""``python -m pipeline.preview --shards DIR --out preview.png``: a grid of augmented training
images (crop, flip, lighting; before the mean subtraction), so a person can check the
augmentation by looking."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.config_values import at_least_one, file_in_the_way, path_arg
from common.streams import silence
from pipeline import LoaderConfig, build_train_loader
from pipeline.failures import loader_failure
from pipeline.normalize import RawBatch
from shards.manifest import load


def augmented_pixels(raw: RawBatch, lighting: torch.Tensor) -> np.ndarray:
    """What the network sees before the mean image is subtracted: each uint8 crop, flipped
    where drawn, plus its PCA lighting offset ``L @ alpha``, clipped to (N, h, w, 3) uint8.

    Exact, not an approximation: the loader hands over the crops and the draws separately.
    """
    offset = raw.alpha.float() @ lighting.T.cpu()
    x = raw.images.cpu().float()
    x = torch.where(raw.mirror.cpu().bool().reshape(-1, 1, 1, 1), x.flip(2), x) + offset[:, None, None, :]
    return x.clamp(0, 255).round().to(torch.uint8).numpy()


def grid(tiles: np.ndarray, cols: int, pad: int = 4) -> Image.Image:
    """Tile (N,H,W,3) uint8 images into one picture, ``cols`` per row."""
    n, h, w, _ = tiles.shape
    rows = -(-n // cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = tile
    return Image.fromarray(canvas)


MAX_COUNT = 1024


def count_arg(value: str) -> int:
    """``--count``: 1..``MAX_COUNT``.  The images are one batch of the loader, decoded at once: a
    count of 100000 was killed by the kernel for its memory (exit 137) with no line, and a grid of
    more than a thousand tiles is past looking at anyway."""
    number = at_least_one()(value)
    if number > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_COUNT} (the images drawn at once, one batch in memory; "
                                         f"a grid past that is too tall to look at), got {value}")
    return number


def quiet_native_stderr() -> None:
    """Point file descriptor 2 at /dev/null, ``sys.stderr`` staying on the terminal: after a
    failure DALI's threads go on decoding the batches already scheduled, and the decoder logs each
    bad sample from C++ straight to descriptor 2, after the one line that names the shard."""
    sys.stderr.flush()
    terminal = os.dup(2)
    silence(2)
    sys.stderr = os.fdopen(terminal, "w", buffering=1)


def main(argv: list[str] | None = None) -> int:
    """Save ``--count`` augmented training images as a grid PNG; bad input is one line on stderr
    (exit 2 a setting, 1 the shards, a shard DALI cannot read or decode, or the output file), not
    a traceback."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.preview", description=" ".join(__doc__.split()))
    parser.add_argument("--shards", type=path_arg, required=True)
    parser.add_argument("--out", type=path_arg, default=Path("preview.png"), help="the PNG to write")
    parser.add_argument("--count", type=count_arg, default=32,
                        help=f"images in the grid (1..{MAX_COUNT}; all of the train split if it holds fewer)")
    parser.add_argument("--cols", type=at_least_one(), default=8)
    parser.add_argument("--sigma", type=float, default=0.1, help="PCA lighting sigma (try 1.0 to see it)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        cfg = LoaderConfig(batch_size=args.count, threads=2, seed=args.seed, sigma=args.sigma).validate()
    except ValueError as exc:  # --sigma: the one flag argparse leaves to LoaderConfig, whose message starts with it
        print(f"preview: --{exc}", file=sys.stderr)
        return 2
    blocker = file_in_the_way(args.out.parent)
    if blocker is not None:  # mkdir would say only "File exists" or "Not a directory", after the decoding
        print(f"preview: cannot write {args.out}: {blocker} is a file, not a directory: choose another --out, "
              "or move the file away", file=sys.stderr)
        return 1
    try:
        manifest = load(args.shards, splits=("train",))
        # One epoch at most: a larger batch is the split's images and padding, trimmed to the split.
        cfg = dataclasses.replace(cfg, batch_size=min(args.count, manifest.splits["train"].samples))
        loader = build_train_loader(manifest, config=cfg)
        raw = next(loader.raw_batches())
        picture = grid(augmented_pixels(raw, loader.normalizer.lighting), min(args.cols, len(raw)))
    except ValueError as exc:  # shards.manifest.ManifestError: the shard directory, named, with the fix
        print(f"preview: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # DALI: a sample it cannot read or decode (a shard damaged since written)
        quiet_native_stderr()
        print(f"preview: {loader_failure(exc, manifest, 'train')}", file=sys.stderr)
        return 1
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        picture.save(args.out, format="PNG")  # whatever the name ends in (".png" or not)
    except OSError as exc:
        print(f"preview: cannot write {args.out} ({exc.strerror or exc})", file=sys.stderr)
        return 1
    short = f": all the train split holds, fewer than --count {args.count}" if len(raw) < args.count else ""
    print(f"wrote {args.out} ({len(raw)} augmented training images{short})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
