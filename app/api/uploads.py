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
import tokenize

import numpy as np
from numpy.lib import format as npy_format
from PIL import Image, UnidentifiedImageError

from app.api.errors import ApiError, invalid
from app.api.schemas import MAX_LATENT_ABS
from app.images import from_uint8

# What numpy raises on a malformed .npy: a header it cannot parse (version 1.0/2.0 headers go through
# `tokenize`, which raises its own TokenError on an unclosed bracket), a short or unreadable file.
_NOT_NPY = (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError)

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
# Lossy codecs do not keep a grey pixel's channels exactly equal: libwebp's YUV -> RGB conversion puts G
# one level off R and B for a greyscale picture. A 1-channel model accepts this much spread from JPEG
# and WebP (never from PNG) and takes the ITU-R 601 luma of such pixels.
LOSSY_GREY_TOLERANCE = 2
# 16-bit greyscale (PNG opens as I;16) and 32-bit integer modes, mapped to 8 bits with x >> 8.
_GREY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Modes Pillow converts to RGB(A) faithfully; anything else (CMYK, …) is refused by name.
_CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "YCbCr")
_ALPHA_MODES = ("LA", "PA", "RGBA")
_WANT = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}


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
    """A base64 PNG/JPEG/WebP of the model's size -> (C, H, W) float32 in [-1, 1].

    What a model of `channels` takes (anything else is a 422 naming the field and saying why):

    - 1 channel: a greyscale image (mode L or 1), or any colour-mode image (RGB, palette, WebP, which
      Pillow always decodes as RGB, …) whose pixels all have r == g == b; from JPEG and WebP the
      channels may differ by up to `LOSSY_GREY_TOLERANCE` levels (codec rounding), and such pixels
      become their ITU-R 601 luma. An image with colour is refused ("has colour: …").
    - 3 channels: an RGB image, or a greyscale one, whose grey level becomes r = g = b.
    - 16-bit greyscale PNGs (mode I;16) are mapped to 8 bits with `x >> 8` (the high byte), as Pillow
      itself maps 16-bit RGB PNGs; 8-bit values stored as 16 bits (x · 257) come back exactly.
    - Transparency: an alpha channel (or PNG tRNS colour) where every pixel is fully opaque is dropped;
      any pixel that is not fully opaque is refused, since the model has no alpha channel and the
      server will not guess the background to flatten it onto.
    - Only still images: an animated PNG or WebP (more than one frame) is refused.
    """
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
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            raise invalid(field, f"is an animation of {frames} frames; send a single still image")
        if channels not in _WANT:
            raise invalid(field, f"model takes {channels} channels, which no uploaded image can give")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise _bad(field, f"unreadable image data ({e})") from None
        lossy = image.format in ("JPEG", "WEBP")  # WebP may be either; a spread of 2 levels is grey anyway
        pixels = _pixels(image, channels=channels, field=field, lossy=lossy)
    return from_uint8(pixels[None])[0].numpy()


def _pixels(image: Image.Image, *, channels: int, field: str, lossy: bool) -> np.ndarray:
    """A decoded image -> uint8 (H, W) for 1 channel or (H, W, 3) for 3, per `decode_image`'s rules."""
    mode, transparent = image.mode, image.info.get("transparency")
    if mode in _GREY16_MODES:
        raw = np.asarray(image).astype(np.int64)
        if raw.min() < 0 or raw.max() > 0xFFFF:
            raise invalid(field, f"mode {mode} values must lie in 0..65535 (16-bit greyscale)")
        if isinstance(transparent, int):
            _require_opaque(field, raw != transparent)
        grey = (raw >> 8).astype(np.uint8)
    elif mode not in _CONVERTIBLE_MODES:
        raise invalid(field, f"expected a {_WANT[channels]} image, got mode {mode}")
    elif mode in ("1", "L") and transparent is None:
        grey = np.asarray(image.convert("L"))
    else:
        has_alpha = mode in _ALPHA_MODES or transparent is not None
        # A tRNS colour becomes alpha 0 in the RGBA conversion, so one check covers both kinds.
        rgba = np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
        if has_alpha:
            _require_opaque(field, rgba[..., 3] == 255)
        rgb = np.ascontiguousarray(rgba[..., :3])
        if channels == 3:
            return rgb
        grey = _grey(rgb, field=field, tolerance=LOSSY_GREY_TOLERANCE if lossy else 0)
    return grey if channels == 1 else np.repeat(grey[..., None], 3, axis=-1)


def _require_opaque(field: str, opaque: np.ndarray) -> None:
    if not opaque.all():
        count = int(opaque.size - np.count_nonzero(opaque))
        raise invalid(
            field,
            f"has transparency: {count} of {opaque.size} pixels are not fully opaque (alpha < 255); the "
            "model has no alpha channel and the server does not guess a background, so flatten the "
            "image onto one (or drop the alpha channel) and send it again",
        )


def _grey(rgb: np.ndarray, *, field: str, tolerance: int) -> np.ndarray:
    """(H, W, 3) uint8 whose channels agree within `tolerance` -> (H, W) grey; 422 'has colour' else."""
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    coloured = spread > tolerance
    if coloured.any():
        y, x = (int(v) for v in np.argwhere(coloured)[0])
        r, g, b = (int(v) for v in rgb[y, x])
        allowed = f"by more than {tolerance} levels " if tolerance else ""
        raise invalid(
            field,
            f"expected a {_WANT[1]} image, but it has colour: {int(coloured.sum())} of {coloured.size} "
            f"pixels have r, g, b that differ {allowed}(the first at x={x}, y={y}: r={r}, g={g}, b={b}); "
            "send it in greyscale",
        )
    if tolerance == 0:
        return rgb[..., 0]
    return np.asarray(Image.fromarray(rgb, "RGB").convert("L"))  # ITU-R 601 luma; r == g == b -> r


def decode_latents(
    text: str,
    *,
    shape: tuple[int, ...],
    max_bytes: int,
    max_abs: float = MAX_LATENT_ABS,
    field: str = "latents",
) -> np.ndarray:
    """A base64 .npy of finite floats within ±`max_abs`, with exactly `shape` -> float32 array (never
    unpickles).

    The header is checked before the array is read: `np.load` allocates whatever shape a header
    declares, so a 100-byte file could otherwise ask for terabytes. The bound is checked on the values
    as sent, before the cast to float32, so a float64 1e300 is refused for its size, not as infinite.
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
    except _NOT_NPY as e:
        raise invalid(field, f"not a .npy array ({e})") from None
    if dtype.kind != "f" or dtype.itemsize > 8:
        raise invalid(field, f"expected floating-point (float32) values, got {dtype}")
    if tuple(declared) != tuple(shape):
        raise invalid(field, f"expected shape {tuple(shape)}, got {tuple(declared)}")
    stream.seek(0)
    try:
        array = np.load(stream, allow_pickle=False)
    except _NOT_NPY as e:
        raise invalid(field, f"not a .npy array ({e})") from None
    if not np.isfinite(array).all():
        raise invalid(field, "contains NaN or infinite values")
    if array.size and (peak := float(np.abs(array).max())) > max_abs:
        raise invalid(
            field,
            f"values must lie within ±{max_abs:g}, got {peak:.6g}: x_T is a draw from N(0, I), which "
            "hardly ever leaves ±6, so larger values are a mistake (and huge ones overflow the sampler)",
        )
    return array.astype(np.float32)
