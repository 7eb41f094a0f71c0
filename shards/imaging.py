"""Turn one encoded input image into the 256x256 RGB JPEG that goes into a shard.

Decode -> 3-channel RGB -> resize (shorter side 256, antialiased) and centre crop in one
resampling step -> JPEG.  Anything that cannot be decoded raises ``BadImage`` with a reason a
person can act on; anything that had to be converted (CMYK, grayscale, PNG under a ``.JPEG``
name, alpha, 16-bit ...) comes back with a note, so the manifest can list it.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError, features

# ImageNet has images up to about 50 Mpx; anything far beyond is more likely a bomb than a photo.
Image.MAX_IMAGE_PIXELS = 200_000_000


class BadImage(ValueError):
    """The input cannot become a training image; ``str(exc)`` is the reason."""


@dataclass(frozen=True)
class Prepared:
    """A shard-ready JPEG, its pixels' source size and format, and what was changed in its pixels
    on the way (CMYK, alpha, 16-bit, a tiny image blown up, an animation's other frames): what a
    person judging a prediction on the image wants to know, where the format alone is not."""

    jpeg: bytes
    source_size: tuple[int, int]
    source_format: str
    changes: tuple[str, ...] = ()

    @property
    def note(self) -> str | None:
        """For the manifest's list of converted files: the changes, and a non-JPEG re-encoded."""
        recoded = () if self.source_format == "JPEG" else (f"{self.source_format} file re-encoded as JPEG",)
        return "; ".join(recoded + self.changes) or None


def _decode(data: bytes, size: int) -> tuple[Image.Image, str, tuple[int, int]]:
    """Open and fully decode ``data``; JPEGs at least twice the target are draft-decoded."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # "... support not installed": said below in our own words (``_undecodable``)
            warnings.filterwarnings("ignore", message=r".*support not installed", category=UserWarning)
            img = Image.open(io.BytesIO(data))
            fmt, source_size = img.format or "unknown", img.size
            if fmt == "JPEG" and min(img.size) >= 2 * size:
                # libjpeg's DCT scaling (1/2, 1/4, 1/8) keeps both sides >= size: much faster.
                img.draft(img.mode if img.mode == "CMYK" else "RGB", (size, size))
            img.load()
    except UnidentifiedImageError:
        raise BadImage(_undecodable(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"too many pixels to be a photo ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"truncated or corrupt image ({exc})") from None
    return img, fmt, source_size


# Image formats Pillow reads only when built with their library, by their files' signatures.
_OPTIONAL_FORMATS = ((lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP", "WebP", "webp", "libwebp"),
                     (lambda d: d[4:8] == b"ftyp" and d[8:12] in (b"avif", b"avis"), "AVIF", "avif", "libavif"))


def _undecodable(data: bytes) -> str:
    """Why no decoder took ``data``: a format this Pillow was built without, or no image at all."""
    for matches, name, feature, library in _OPTIONAL_FORMATS:
        if matches(data) and not features.check(feature):
            return (f"a {name} image, which this Pillow build cannot decode (built without {library}); "
                    "convert it to JPEG or PNG")
    return "not an image (no decoder recognises the bytes)"


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Any PIL mode -> RGB, with a note saying what was converted."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        # I;16 is 16-bit by definition; plain I (32-bit) is treated as 16-bit when values exceed 8 bits.
        scale = 257.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
        gray = Image.fromarray(np.clip(a / scale + 0.5, 0, 255).astype(np.uint8))
        return gray.convert("RGB"), f"{mode} (16-bit) scaled to 8-bit RGB"
    if mode == "F":
        gray = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
        return gray.convert("RGB"), "float image converted to RGB"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} with alpha flattened onto white"
    labels = {"CMYK": "CMYK converted to RGB", "L": "grayscale converted to RGB", "1": "1-bit converted to RGB",
              "P": "palette converted to RGB"}
    return img.convert("RGB"), labels.get(mode, f"{mode} converted to RGB")


def _converted(img: Image.Image) -> tuple[Image.Image, str | None]:
    """``_to_rgb``, with any failure of Pillow's (a mode it cannot convert in this build, such as
    a LAB TIFF without littlecms: an ImportError) as ``BadImage``.  Why: such an exception went
    past the worker's skip handling and stopped the whole run, and every re-run, on one file."""
    try:
        return _to_rgb(img)
    except (MemoryError, BadImage):
        raise
    except Exception as exc:  # noqa: BLE001 (Pillow raises many types on odd inputs)
        raise BadImage(f"a {img.mode} image this Pillow cannot convert to RGB ({type(exc).__name__}: {exc}); "
                       "convert it to an RGB JPEG") from None


def _frame_count(data: bytes) -> int:
    """How many frames (an animation's, a TIFF's pages) the file holds, of which Pillow decoded the
    first; 0 when they cannot be counted.  Counted on a second opening of the bytes: counting seeks
    through the file, which fails on one cut short after its first frame (a TIFF: TypeError) and
    leaves the image it ran on at another frame, unconvertible."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a damaged later frame's warnings: the note says it
            return getattr(Image.open(io.BytesIO(data)), "n_frames", 1)
    except Exception:  # noqa: BLE001 (Pillow raises many types on odd inputs)
        return 0


# EXIF orientation (tag 0x0112) -> how the stored pixels stand against the picture as meant.
_ORIENTATIONS = {2: "mirrored", 3: "upside down", 4: "upside down and mirrored", 5: "on its side and mirrored",
                 6: "on its side", 7: "on its side and mirrored", 8: "on its side"}


def _orientation_ignored(img: Image.Image) -> str | None:
    """What an EXIF orientation tag asked for and did not get: a phone's portrait photo is stored on
    its side with tag 6.  Not applied, as in the shards of ImageNet's files; said, as it bears on a
    prediction for such a photo."""
    try:
        tag = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 (a damaged EXIF block: the pixels are what they are)
        return None
    return f"EXIF orientation {tag} not applied: seen {_ORIENTATIONS[tag]}, as stored" if tag in _ORIENTATIONS else None


def prepare(data: bytes, size: int = 256, quality: int = 90) -> Prepared:
    """Decode ``data`` and return the centre ``size`` x ``size`` crop of its short-side resize, as JPEG."""
    img, fmt, source_size = _decode(data, size)
    rgb, note = _converted(img)
    changes = tuple(c for c in (note, _orientation_ignored(img)) if c)
    if (frames := 1 if fmt == "JPEG" else _frame_count(data)) != 1:
        changes += (f"first of {frames} frames used" if frames else "first frame used, the rest unreadable",)
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    # One resampling from the centre square == resize shorter side to `size`, then centre crop.
    out = rgb.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
    if side * 4 < size:
        # Small images are common and fine; only the ones blown up more than 4x are worth a look.
        changes += (f"tiny image upscaled from {w}x{h}",)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=quality)
    return Prepared(buf.getvalue(), source_size, fmt, changes)
