"""Safe image loading: records are untrusted.

`load_image(source, image_root=..., max_pixels=...)` returns an RGB PIL image or raises
`ImageError` with a short `reason`:

  path_outside_root   a path that escapes image_root (`..`, absolute, or a symlink out)
  missing             no file at the path
  empty               a zero-byte file or empty bytes
  unreadable          not an image PIL can identify, or bad base64
  truncated           the data ends before the image does
  too_many_pixels     width * height above max_pixels (decompression bombs), checked
                      from the header before any pixel is decoded; also Pillow's own
                      refusal (DecompressionBombError, above 2x Image.MAX_IMAGE_PIXELS)

Any other exception Pillow or a decoder raises while opening or decoding becomes
`unreadable` with the exception's class and message: one bad file is one bad record
(raised or skipped by the policy), never a crashed data task.

EXIF orientation is applied; palette, CMYK, LA/RGBA, 16-bit and float modes become RGB
(transparent areas on white).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import pathlib
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlrlhf.errors import ReasonError

DEFAULT_MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; real VLM inputs are far smaller
_BASE64 = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}$")
_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


class ImageError(ReasonError):
    """An image that cannot be used (see the reasons above)."""


def describe(source) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, str) and (source.startswith("data:") or len(source) > 120):
        return f"<{len(source)}-character inline image>"
    return repr(source)


def resolve_path(path: str, image_root: str | os.PathLike | None) -> pathlib.Path:
    """The real path of `path` inside `image_root`, refusing any escape from it."""
    if image_root is None:
        raise ImageError("path_outside_root", f"{path!r}: image paths need data.image_root")
    root = pathlib.Path(image_root).resolve()
    candidate = pathlib.Path(path)
    if not candidate.is_absolute():
        candidate = root / candidate
    real = candidate.resolve()  # follows symlinks, folds '..'
    if real != root and root not in real.parents:
        raise ImageError("path_outside_root", f"{path!r} resolves to {real}, outside image_root {root}")
    return real


def read_source(source, image_root) -> bytes:
    if isinstance(source, dict):  # Hugging Face / Parquet image cells: {"bytes": ..., "path": ...}
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if not isinstance(source, str):
        raise ImageError("unreadable", f"image source of type {type(source).__name__}")
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise ImageError("unreadable", "data URI without base64 payload")
        return _b64decode(payload)
    inline = _inline_base64(source)
    if inline is not None:
        return inline
    path = resolve_path(source, image_root)
    if not path.is_file():
        raise ImageError("missing", f"no image file at {path}")
    return path.read_bytes()


def _b64decode(payload: str) -> bytes:
    try:
        return base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError("unreadable", f"bad base64 ({error})") from error


def _inline_base64(text: str) -> bytes | None:
    """Bytes of a bare base64 image string, or None when `text` is (probably) a path:
    only strings that decode to a known image signature count as inline images."""
    if len(text) < 16 or not _BASE64.match(text[:4096]):
        return None
    try:
        data = _b64decode(text)
    except ImageError:
        return None
    return data if data.startswith(_SIGNATURES) else None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / high * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(source, *, image_root=None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    data = read_source(source, image_root)
    if not data:
        raise ImageError("empty", f"{describe(source)} is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # not an OSError: Pillow refuses it in open()
        raise ImageError("too_many_pixels", f"{describe(source)}: {error}") from error
    except (UnidentifiedImageError, OSError) as error:
        raise ImageError("unreadable", f"{describe(source)} is not a readable image ({error})") from error
    except Exception as error:  # noqa: BLE001 - any decoder failure is a bad record, not a crash
        raise ImageError("unreadable", f"{describe(source)} cannot be opened "
                                       f"({type(error).__name__}: {error})") from error
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError("too_many_pixels", f"{describe(source)} is {width}x{height}, above max_pixels={max_pixels}")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Image.DecompressionBombError as error:
        raise ImageError("too_many_pixels", f"{describe(source)}: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        reason = "truncated" if "truncated" in str(error).lower() else "unreadable"
        raise ImageError(reason, f"{describe(source)} cannot be decoded ({error})") from error
    except Exception as error:  # noqa: BLE001
        raise ImageError("unreadable", f"{describe(source)} cannot be decoded "
                                       f"({type(error).__name__}: {error})") from error
