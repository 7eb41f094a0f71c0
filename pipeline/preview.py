"""``python -m pipeline.preview --shards DIR --out preview.png``: a grid of augmented training
images, un-normalised back to pixels, so a person can check the augmentation by looking."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import LoaderConfig, build_train_loader


def unnormalize(images: np.ndarray, mean_crops: np.ndarray | None = None) -> np.ndarray:
    """(N,3,H,W) mean-subtracted floats -> (N,H,W,3) uint8 for display.

    The per-pixel mean was subtracted at each image's own crop position, which the batch does
    not record; adding back the *centre* crop of the mean image is close (the mean image is
    smooth) and leaves the lighting shift visible, which is the point.
    """
    x = images.transpose(0, 2, 3, 1)
    if mean_crops is not None:
        x = x + mean_crops
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def grid(tiles: np.ndarray, cols: int, pad: int = 4) -> Image.Image:
    """Tile (N,H,W,3) uint8 images into one picture, ``cols`` per row."""
    n, h, w, _ = tiles.shape
    rows = -(-n // cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = tile
    return Image.fromarray(canvas)


def main(argv: list[str] | None = None) -> Path:
    """Save ``--count`` augmented training images as a grid PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("preview.png"))
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--cols", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.1, help="PCA lighting sigma (try 1.0 to see it)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = LoaderConfig(batch_size=args.count, threads=2, seed=args.seed, sigma=args.sigma)
    loader = build_train_loader(args.shards, config=cfg)
    images, _ = next(iter(loader))
    mean = loader.spec.stats.mean_image
    off = (mean.shape[0] - cfg.crop) // 2
    centre = mean[off:off + cfg.crop, off:off + cfg.crop][None]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid(unnormalize(images.float().numpy(), centre), args.cols).save(args.out)
    print(f"wrote {args.out} ({len(images)} augmented training images)")
    return args.out


if __name__ == "__main__":
    main()
