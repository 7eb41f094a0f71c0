"""The real photographs the sample classes are cut from.

scikit-image ships a set of public-domain photographs inside its wheel.  We never import
scikit-image (it would pull Pillow over Pillow-SIMD); ``scripts/setup.sh`` downloads the
wheel into ``.venv/photo-wheels`` and the photos are read straight out of the zip.
"""
from __future__ import annotations

import io
import os
import sys
import zipfile
from pathlib import Path

from PIL import Image

# One class per photo: (class name, file inside the wheel).  Grayscale photos are tinted
# per image by the generator, so no class is identifiable from its colour alone.
PHOTOS: tuple[tuple[str, str], ...] = (
    ("astronaut", "skimage/data/astronaut.png"),
    ("cat", "skimage/data/chelsea.png"),
    ("coffee", "skimage/data/coffee.png"),
    ("galaxies", "skimage/data/hubble_deep_field.jpg"),
    ("tissue", "skimage/data/ihc.png"),
    ("motorcycle", "skimage/data/motorcycle_left.png"),
    ("retina", "skimage/data/retina.jpg"),
    ("rocket", "skimage/data/rocket.jpg"),
    ("cameraman", "skimage/data/camera.png"),
    ("brick", "skimage/data/brick.png"),
    ("grass", "skimage/data/grass.png"),
    ("gravel", "skimage/data/gravel.png"),
)


def find_wheel(search: Path | None = None) -> Path:
    """Locate the scikit-image wheel that ``make setup`` downloaded (or, outside the project's
    environment, e.g. ``make gpu-check PY=python3``, the folder named by $SAMPLEDATA_WHEELS)."""
    folder = search or Path(os.environ.get("SAMPLEDATA_WHEELS") or Path(sys.prefix) / "photo-wheels")
    wheels = sorted(folder.glob("scikit_image-*.whl"))
    if not wheels:
        raise FileNotFoundError(
            f"no scikit-image wheel in {folder}: run `make setup` (it downloads the wheel whose "
            "photographs the sample dataset is made from)"
        )
    return wheels[-1]


def load_photos(count: int, wheel: Path | None = None) -> list[tuple[str, Image.Image]]:
    """The first ``count`` photos as RGB images, with their class names."""
    if not 2 <= count <= len(PHOTOS):
        raise ValueError(f"classes must be between 2 and {len(PHOTOS)}, got {count}")
    wheel = wheel or find_wheel()
    try:
        with zipfile.ZipFile(wheel) as zf:
            return [(name, Image.open(io.BytesIO(zf.read(member))).convert("RGB")) for name, member in PHOTOS[:count]]
    except (zipfile.BadZipFile, KeyError) as exc:  # a download cut short, another wheel's layout: one line, not a traceback
        raise FileNotFoundError(f"{wheel}: not a readable scikit-image wheel ({exc}): delete it and run `make setup` "
                                "to download it again") from None
