"""Opening an image as the models see it: the one place that decodes a user's image file.

Every use goes through ``open_image``: the training and evaluation pipelines
(``tbps.data.transforms.load_image``, ``GalleryImages``), the index (``tbps.index.embed``),
query images (``tbps search --image``, ``POST /search/image``), thumbnails and re-scoring.
So an image is oriented and converted the same way wherever it is seen:

- EXIF orientation is applied (a phone photo stored sideways is embedded upright, as
  its thumbnail shows it);
- every PIL mode becomes 8-bit RGB by its meaning, not by clipping: 16-bit greys
  (``I;16``, ``I;16B``...) are scaled by 1/257 (PIL's own ``convert`` clips them to
  white), 32-bit ``I`` and float ``F`` by their range (``F`` in [0, 1] is scaled by 255;
  ``I``/``F`` above 255 are read as 16-bit), and transparent images (``RGBA``, ``LA``,
  ``PA``, ``P`` with a transparent colour) are composited over white instead of showing
  whatever colour their invisible pixels hold;
- decompression bombs are refused before decoding: ``max_pixels`` bounds the pixels
  actually decoded, and ``draft`` lets JPEG decode at 1/2, 1/4 or 1/8 scale when only a
  small image is needed (a 10000x10000 JPEG asked for at 1024 decodes 1250x1250).

Errors are ``ImageError`` (``ImageTooLarge`` for the pixel limit), marked ``user_error``
so the CLI prints one line naming the file.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Person crops are small; 64 MP (e.g. 8000x8000) is far beyond any real crop, and bounds a
# decode at ~200 MB of RGB. PIL's own limit (error at 179 MP) is looser.
DEFAULT_MAX_PIXELS = 64_000_000
_WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}

Source = Union[str, "os.PathLike[str]", bytes, bytearray, BinaryIO]


class ImageError(ValueError):
    """An image that cannot be read (not an image, truncated, unsupported mode, too large)."""

    user_error = True


class ImageTooLarge(ImageError):
    """The image has more pixels than the caller allows (a possible decompression bomb)."""


def _name(src: Source) -> str:
    if isinstance(src, (bytes, bytearray)):
        return "image"
    if hasattr(src, "read"):
        return str(getattr(src, "name", "image"))
    return str(src)


def open_image(src: Source, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``src`` (a path, bytes or a binary file) into an upright 8-bit RGB image.

    max_pixels: refuse (``ImageTooLarge``) an image that would decode to more pixels than
    this (None: PIL's own limit). draft: (W, H) the caller needs at least; JPEGs then
    decode at the smallest power-of-two scale that still covers it (other formats ignore
    it). The returned image is loaded; no file stays open.
    """
    name = _name(src)
    fp = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray)) else src
    try:
        with warnings.catch_warnings():  # PIL warns above 89 MP; the limit here is max_pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
        with im:
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", (int(draft[0]), int(draft[1])))
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageTooLarge(f"{name}: {w}x{h} pixels is over the limit of {max_pixels} pixels")
            im.load()
            im = ImageOps.exif_transpose(im)  # a copy when rotated; the file is closed below
            return to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (PIL cannot identify the file)") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt data
        raise ImageError(f"{name}: cannot decode ({type(e).__name__}: {e})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, by the rules in the module docstring (no orientation change)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16"):  # 16-bit grey in any byte order: scale 0..65535 to 0..255
        a = np.asarray(im).astype(np.uint32)
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        return Image.fromarray(_grey_to_u8(np.asarray(im), mode), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return im.convert("RGB")  # 1, L, P, CMYK, YCbCr, RGBX, HSV, LAB...
    except ValueError as e:
        raise ImageError(f"image mode {mode!r} cannot be converted to RGB ({e})") from None


def _grey_to_u8(a: np.ndarray, mode: str) -> np.ndarray:
    """A 32-bit integer or float grey array -> uint8 by its range (see the module docstring)."""
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=65535.0, neginf=0.0)
    top = float(a.max()) if a.size else 0.0
    if mode == "F" and top <= 1.0:
        a = a * 255.0
    elif top > 255.0:
        a = np.clip(a, 0.0, 65535.0) * (255.0 / 65535.0)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)
