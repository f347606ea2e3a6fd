"""Opens untrusted images safely and explains what is wrong with a bad one."""
from __future__ import annotations

import base64
import io
import os
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

#: Largest image accepted, in pixels (width * height). Larger files are refused as possible
#: decompression bombs. Override with the environment variable VISUALCHAT_MAX_PIXELS.
MAX_PIXELS = int(os.environ.get("VISUALCHAT_MAX_PIXELS", 40_000_000))


class ImageError(ValueError):
    """An input that is not a usable image. The message says what is wrong, for the user."""


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.path.basename(os.fspath(src)) or os.fspath(src)
    return type(src).__name__


def check_size(im: Image.Image, what: str = "image", max_pixels: int | None = None) -> None:
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    w, h = im.size
    if w * h > limit:
        raise ImageError(
            f"{what} is {w}x{h} = {w * h:,} pixels, over the limit of {limit:,} pixels "
            "(refused as a possible decompression bomb; set VISUALCHAT_MAX_PIXELS to allow more)"
        )
    if w < 1 or h < 1:
        raise ImageError(f"{what} has no pixels ({w}x{h})")


def open_image(src: Any, max_pixels: int | None = None) -> Image.Image:
    """Open ``src`` (a path, bytes, a base64 string prefixed ``base64:``, a file object, a numpy
    array or a PIL image) as a fully decoded RGB PIL image.

    Raises :class:`ImageError` with a clear message for a missing file, a non-image, a corrupt or
    truncated image, or one over the pixel limit. Nothing is decoded before the size is checked."""
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
        if not os.path.exists(src):
            raise ImageError(f"image not found: {os.fspath(src)}")
        if os.path.isdir(src):
            raise ImageError(f"{os.fspath(src)} is a directory, not an image")
        fp = os.fspath(src)
    else:
        fp = src
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                check_size(im, what, max_pixels)  # header only: nothing decoded yet
                im.load()
                return im.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{what} is too large (possible decompression bomb): {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what} is not an image file PIL can read (unknown or unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{what} is corrupt or truncated: {e}") from None
