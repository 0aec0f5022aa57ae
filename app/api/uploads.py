"""Decoding what clients upload: base64 images (PNG/JPEG/WebP) and base64 .npy latents.

Untrusted bytes: sizes are capped before decoding, Pillow's decompression-bomb limit applies and the
declared dimensions are checked before any pixel is decoded, only three formats are accepted, and
`.npy` files are read without pickle. Bad bytes are a 400; well-formed data of the wrong shape for
the model is a 422 that says what was expected.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from numpy.lib import format as npy_format
from PIL import Image, UnidentifiedImageError

from app.api.errors import ApiError, invalid
from app.images import from_uint8

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
# Channels a Pillow mode holds once converted for the model; P (palette) and 1 (bilevel) expand.
_MODE_CHANNELS = {"L": 1, "1": 1, "LA": 2, "RGB": 3, "P": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3}
_MODE_FOR_CHANNELS = {1: "L", 3: "RGB"}


def _bad(field: str, message: str) -> ApiError:
    return ApiError(400, "bad_image", f"{field}: {message}", details=[{"field": field, "message": message}])


def b64decode(text: str, *, field: str, max_bytes: int) -> bytes:
    """Strict base64 (an optional `data:…;base64,` prefix is allowed), refusing over `max_bytes` first."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    # 4 base64 characters carry 3 bytes: refuse by length before allocating the decoded bytes.
    if len(text) > (max_bytes + 2) // 3 * 4 + 4:
        raise _bad(field, f"larger than the {max_bytes}-byte limit")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(field, "not valid base64") from None
    if len(data) > max_bytes:
        raise _bad(field, f"larger than the {max_bytes}-byte limit")
    return data


def decode_image(
    text: str,
    *,
    resolution: int,
    channels: int,
    max_bytes: int,
    max_pixels: int,
    field: str = "image",
) -> np.ndarray:
    """A base64 PNG/JPEG/WebP of the model's size -> (C, H, W) float32 in [-1, 1]."""
    data = b64decode(text, field=field, max_bytes=max_bytes)
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise _bad(field, f"not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})") from None
    except Image.DecompressionBombError:
        raise _bad(field, f"declares more than {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise _bad(field, f"unreadable image data ({e})") from None
    with image:
        width, height = image.size
        # Only the header has been read so far: refuse huge dimensions before decoding any pixel.
        if width * height > max_pixels:
            raise _bad(field, f"{width}×{height} is more than the {max_pixels}-pixel limit")
        if image.format not in ALLOWED_FORMATS:
            raise _bad(field, f"format {image.format} is not accepted; send PNG, JPEG or WebP")
        if (width, height) != (resolution, resolution):
            raise invalid(field, f"expected a {resolution}×{resolution} image, got {width}×{height}")
        got = _MODE_CHANNELS.get(image.mode)
        if got != channels or channels not in _MODE_FOR_CHANNELS:
            want = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}.get(channels, f"{channels} channels")
            raise invalid(field, f"expected a {want} image, got mode {image.mode}")
        try:
            pixels = np.asarray(image.convert(_MODE_FOR_CHANNELS[channels]))
        except (OSError, SyntaxError, ValueError) as e:
            raise _bad(field, f"unreadable image data ({e})") from None
    return from_uint8(pixels[None])[0].numpy()


def decode_latents(
    text: str, *, shape: tuple[int, ...], max_bytes: int, field: str = "latents"
) -> np.ndarray:
    """A base64 .npy of finite floats with exactly `shape` -> float32 array (never unpickles).

    The header is checked before the array is read: `np.load` allocates whatever shape a header
    declares, so a 100-byte file could otherwise ask for terabytes.
    """
    try:
        data = b64decode(text, field=field, max_bytes=max_bytes)
    except ApiError as e:
        raise invalid(field, e.message.split(": ", 1)[1]) from None
    stream = io.BytesIO(data)
    try:
        version = npy_format.read_magic(stream)
        read_header = (
            npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        )
        declared, _, dtype = read_header(stream)
    except (ValueError, OSError, EOFError) as e:
        raise invalid(field, f"not a .npy array ({e})") from None
    if dtype.kind != "f" or dtype.itemsize > 8:
        raise invalid(field, f"expected floating-point (float32) values, got {dtype}")
    if tuple(declared) != tuple(shape):
        raise invalid(field, f"expected shape {tuple(shape)}, got {tuple(declared)}")
    stream.seek(0)
    try:
        array = np.load(stream, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise invalid(field, f"not a .npy array ({e})") from None
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise invalid(field, "contains NaN or infinite values")
    return array
