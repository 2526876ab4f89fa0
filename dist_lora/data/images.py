"""Opening a source image once, safely: reject what cannot be trained on, convert the rest to 8-bit RGB."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is rejected, never half-decoded

DEFAULT_MAX_PIXELS = 178_956_970  # twice PIL's default bomb limit: larger than any real photo (13k x 13k)


class RejectedImage(Exception):  # noqa: N818 - a verdict, not a failure of the program
    """The file cannot be used; ``str(exc)`` is the reason written to the report."""


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # PIL's convert("RGB") clips 16-bit values at 255 (a white image); scale 0..65535 to 0..255 instead.
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or array.max(initial=0) > 255:
        array = array / 257.0
    grey = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def to_rgb(image: Image.Image, keep_alpha: bool = False) -> Image.Image:
    """EXIF orientation applied; CMYK, palette, grey, 16-bit to 8-bit RGB; transparency composited on white,
    or with ``keep_alpha`` kept: RGBA whose colour is left as stored (kohya's alpha_mask trains on it)."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        return _sixteen_bit_to_rgb(image)
    if _has_alpha(image) and keep_alpha:
        return image.convert("RGBA")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def open_image(path: Path, *, min_side: int, max_pixels: int = DEFAULT_MAX_PIXELS,
               keep_alpha: bool = False, data: bytes | None = None) -> Image.Image:
    """The decoded RGB image (RGBA with ``keep_alpha`` when it has transparency), or ``RejectedImage``
    saying why not. ``data``: the file's bytes (a member of a tar shard), ``path`` then only names it.

    The size is checked from the header before any pixel is decoded, so a decompression bomb costs
    nothing; the full decode then catches truncated and corrupt files.
    """
    try:
        size = len(data) if data is not None else path.stat().st_size
    except OSError as exc:
        raise RejectedImage(f"unreadable: {exc.strerror or exc}") from exc
    if size == 0:
        raise RejectedImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data) if data is not None else path) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise RejectedImage(f"decompression bomb: {width}x{height} = {width * height} pixels exceeds "
                                        f"the limit of {max_pixels} (prepare --max-pixels)")
                if min(width, height) < min_side:
                    raise RejectedImage(f"too small: {width}x{height}, the shorter side is below the minimum of "
                                        f"{min_side} (prepare --min-side)")
                opened.load()
                return to_rgb(opened, keep_alpha)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise RejectedImage(f"decompression bomb: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise RejectedImage(f"not an image: {path.suffix} file that no image decoder recognises") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            # PIL signals truncated and corrupt data as OSError (or SyntaxError for broken PNG chunks).
            raise RejectedImage(f"corrupt or truncated: {exc}") from exc
