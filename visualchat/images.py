"""Opens untrusted images safely and explains what is wrong with a bad one.

Every limit is checked on the header, before a single pixel is decoded (``Image.open`` only reads
the header; ``load()`` decodes):

* the pixel count (``VISUALCHAT_MAX_PIXELS``, default 40 M),
* each side (``VISUALCHAT_MAX_SIDE``, default 16,384 px): a 1 x 39,000,000 PNG of 75 KB has "only"
  39 M pixels, but Pillow keeps one row pointer per line and decoding it takes gigabytes,
* the aspect ratio (``VISUALCHAT_MAX_ASPECT``, default 64:1),
* the format: only PNG, JPEG (with its MPO variant from phones), GIF, WebP and BMP are opened, so a
  file in another format (EPS, which Pillow hands to Ghostscript; PSD; TIFF; ...) never reaches its
  decoder.

A large JPEG is decoded at a reduced scale (``draft``: 1/2, 1/4 or 1/8 inside the decoder), and any
decoded image is reduced to at most :data:`DECODE_MAX_SIDE` on its longer side (the encoders see at
most 448 px, the chat shows at most 1024), so a conversation does not keep 40 M-pixel images alive.
"""
from __future__ import annotations

import base64
import io
import math
import os
import re
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

from .limits import Limits


_LIMITS = Limits.from_env()
#: Largest image accepted, in pixels (width * height). Larger files are refused as possible
#: decompression bombs. Override with the environment variable VISUALCHAT_MAX_PIXELS.
MAX_PIXELS = _LIMITS.max_pixels
#: Longest side accepted, in pixels (VISUALCHAT_MAX_SIDE).
MAX_SIDE = _LIMITS.max_side
#: Largest ratio of the longer to the shorter side (VISUALCHAT_MAX_ASPECT).
MAX_ASPECT = _LIMITS.max_aspect
#: Decoded images are reduced to at most this many pixels on their longer side.
DECODE_MAX_SIDE = 2048
#: The file formats opened (Pillow's names); anything else is refused before its decoder runs.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")  # JPEG covers MPO (phone photos)
_FORMAT_NAMES = "PNG, JPEG, GIF, WebP or BMP"


class ImageError(ValueError):
    """An input that is not a usable image. The message says what is wrong, for the user; ``knob`` names
    the operator's setting behind a limit it broke (for the server's log, not for the user)."""

    def __init__(self, message: str, knob: str | None = None):
        super().__init__(message)
        self.knob = knob


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.path.basename(os.fspath(src)) or os.fspath(src)
    return type(src).__name__


def check_size(im: Image.Image, what: str = "image", max_pixels: int | None = None) -> None:
    """Refuse ``im`` (only its header needs to be read) when it has no pixels, too many pixels, a
    side over :data:`MAX_SIDE` or an aspect ratio over :data:`MAX_ASPECT`, in this app's words."""
    check_dims(im.size[0], im.size[1], what, max_pixels)


def check_dims(w: int, h: int, what: str = "image", max_pixels: int | None = None) -> None:
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if w < 1 or h < 1:
        raise ImageError(f"{what} has no pixels ({w}x{h})")
    if w * h > limit:
        raise ImageError(
            f"{what} is {w}x{h} = {w * h:,} pixels; this app accepts images of up to {limit:,} pixels "
            "(a larger one is refused as a possible decompression bomb). Scale it down and send it again",
            knob="VISUALCHAT_MAX_PIXELS")
    if max(w, h) > MAX_SIDE:
        raise ImageError(
            f"{what} is {w}x{h} pixels; this app accepts images of up to {MAX_SIDE:,} pixels on a side "
            "(a longer one is refused as a possible decompression bomb). Scale it down and send it again",
            knob="VISUALCHAT_MAX_SIDE")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageError(
            f"{what} is {w}x{h} pixels, {max(w, h) / min(w, h):,.0f} times as long as it is wide; this app "
            f"accepts an aspect ratio of up to {MAX_ASPECT}:1. Crop it and send it again", knob="VISUALCHAT_MAX_ASPECT")


def _bomb_message(what: str, e: Exception, max_pixels: int | None) -> str:
    """Pillow's own decompression-bomb check fired (over twice its MAX_IMAGE_PIXELS): say it our way."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    m = re.search(r"\((\d+) pixels\)", str(e))
    size = f"has {int(m.group(1)):,} pixels" if m else "has too many pixels"
    return (f"{what} {size}; this app accepts images of up to {limit:,} pixels (a larger one is refused as a "
            "possible decompression bomb). Scale it down and send it again")


def _shrink(im: Image.Image) -> Image.Image:
    """Reduce a decoded image to at most DECODE_MAX_SIDE on its longer side (integer box reduction)."""
    factor = -(-max(im.size) // DECODE_MAX_SIDE)  # ceil
    if factor >= 2:
        im = im.reduce(factor)
    return im


def _decode(im: Image.Image) -> Image.Image:
    """Decode an opened (header-only) image to RGB without materialising more than needed."""
    w, h = im.size
    if im.format in ("JPEG", "MPO") and max(w, h) > 2 * DECODE_MAX_SIDE:
        scale = DECODE_MAX_SIDE / max(w, h)
        # draft picks the largest of 1/1, 1/2, 1/4, 1/8 that keeps at least the requested size
        im.draft("RGB", (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
    im.load()
    return _shrink(im.convert("RGB"))


def open_image(src: Any, max_pixels: int | None = None) -> Image.Image:
    """Open ``src`` (a path, bytes, a base64 string prefixed ``base64:``, a file object, a numpy
    array or a PIL image) as a fully decoded RGB PIL image.

    Raises :class:`ImageError` with a clear message for a missing file, a non-image, a format that is
    not opened (see :data:`FORMATS`), a corrupt or truncated image, or one over the pixel, side or
    aspect limits. Nothing is decoded before the header has passed every check."""
    what = _describe(src)
    if isinstance(src, Image.Image):
        check_size(src, what, max_pixels)
        return src.convert("RGB")
    try:
        import numpy as np

        if isinstance(src, np.ndarray):
            im = Image.fromarray(src)
            check_size(im, "array image", max_pixels)
            return im.convert("RGB")
    except ImportError:  # pragma: no cover - numpy ships with torch
        pass
    if isinstance(src, str) and src.startswith("base64:"):
        try:
            src = base64.b64decode(src[len("base64:"):], validate=False)
        except Exception as e:
            raise ImageError(f"base64 image data could not be decoded: {e}") from None
        what = "base64 image"
    if isinstance(src, (bytes, bytearray)):
        fp: Any = io.BytesIO(src)
        what = "uploaded data" if what in ("bytes", "bytearray") else what
    elif isinstance(src, (str, os.PathLike)):
        if not os.path.exists(src):  # the file's name only: its folder is the server's business
            raise ImageError(f"image not found: {what}")
        if os.path.isdir(src):
            raise ImageError(f"{what} is a directory, not an image")
        fp = os.fspath(src)
    else:
        fp = src
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own MAX_IMAGE_PIXELS (89 M); ours (checked next) is the one that counts
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp, formats=FORMATS) as im:
                check_size(im, what, max_pixels)  # header only: nothing decoded yet
                return _decode(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(_bomb_message(what, e, max_pixels), knob="VISUALCHAT_MAX_PIXELS") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what} is not an image file this app opens (it accepts {_FORMAT_NAMES})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{what} is corrupt or truncated: {e}") from None
