"""Uploaded images and latents: what decodes, and the 400/422 a client gets for everything else."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from app.api.errors import ApiError
from app.api.uploads import decode_image, decode_latents

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 4096 * 4096}


def encode(image: Image.Image, fmt: str, **kwargs) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return base64.b64encode(buf.getvalue()).decode()


def gradient(mode: str, size: int = 8) -> Image.Image:
    values = np.arange(size * size, dtype=np.uint8).reshape(size, size) * 3
    if mode == "RGB":
        values = np.stack([values, 255 - values, np.full_like(values, 128)], axis=-1)
    return Image.fromarray(values, mode=mode)


def png_declaring(width: int, height: int) -> str:
    """A tiny PNG whose header claims `width`×`height` (the decompression-bomb shape)."""
    raw = io.BytesIO()
    Image.new("L", (1, 1)).save(raw, format="PNG")
    data = bytearray(raw.getvalue())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return base64.b64encode(bytes(data)).decode()


def test_grayscale_png_maps_0_and_255_to_minus_one_and_one():
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[0, 0] = 255
    x = decode_image(encode(Image.fromarray(pixels, mode="L"), "PNG"), resolution=8, channels=1, **LIMITS)
    assert x.shape == (1, 8, 8) and x.dtype == np.float32
    assert x[0, 0, 0] == 1.0 and x[0, 0, 1] == -1.0


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_rgb_in_each_accepted_format_decodes_to_chw(fmt):
    image = gradient("RGB")
    x = decode_image(
        encode(image, fmt, quality=95) if fmt != "PNG" else encode(image, fmt),
        resolution=8,
        channels=3,
        **LIMITS,
    )
    assert x.shape == (3, 8, 8)
    assert x.min() >= -1.0 and x.max() <= 1.0
    expected = np.asarray(image).transpose(2, 0, 1) / 127.5 - 1
    assert np.abs(x - expected).max() < (0.01 if fmt == "PNG" else 0.3)


def test_a_data_url_prefix_is_accepted():
    text = "data:image/png;base64," + encode(gradient("L"), "PNG")
    assert decode_image(text, resolution=8, channels=1, **LIMITS).shape == (1, 8, 8)


def expect(status: int, call, *words: str) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    assert info.value.status == status, info.value.message
    for word in words:
        assert word in info.value.message
    return info.value


def test_gif_is_refused_with_the_accepted_formats_named():
    gif = encode(gradient("L"), "GIF")
    expect(400, lambda: decode_image(gif, resolution=8, channels=1, **LIMITS), "PNG", "JPEG", "WEBP")


def test_corrupt_base64_is_a_400():
    expect(400, lambda: decode_image("not base64!!", resolution=8, channels=1, **LIMITS), "base64")


def test_bytes_that_are_no_image_are_a_400():
    text = base64.b64encode(b"hello, this is not a picture at all").decode()
    expect(400, lambda: decode_image(text, resolution=8, channels=1, **LIMITS), "image")


def test_a_truncated_png_is_a_400():
    data = base64.b64decode(encode(gradient("RGB", 32), "PNG"))
    text = base64.b64encode(data[: len(data) // 2]).decode()
    expect(400, lambda: decode_image(text, resolution=32, channels=3, **LIMITS))


def test_a_png_declaring_huge_dimensions_is_refused_before_decoding():
    bomb = png_declaring(100_000, 100_000)  # 10¹⁰ pixels in a ~70-byte file
    expect(400, lambda: decode_image(bomb, resolution=8, channels=1, **LIMITS), "pixel")
    small_limit = {**LIMITS, "max_pixels": 1000}
    expect(400, lambda: decode_image(png_declaring(64, 64), resolution=64, channels=1, **small_limit), "1000")


def test_oversized_upload_is_refused_before_base64_decoding():
    text = "A" * 4000
    expect(
        400, lambda: decode_image(text, resolution=8, channels=1, max_bytes=1000, max_pixels=10**6), "limit"
    )


def test_wrong_size_is_a_422_naming_the_expected_size():
    text = encode(gradient("L", 16), "PNG")
    error = expect(422, lambda: decode_image(text, resolution=8, channels=1, **LIMITS), "8×8", "16×16")
    assert error.details[0]["field"] == "image"


def test_wrong_channels_is_a_422_naming_the_expected_channels():
    rgb = encode(gradient("RGB"), "PNG")
    expect(422, lambda: decode_image(rgb, resolution=8, channels=1, **LIMITS), "grayscale", "RGB")
    gray = encode(gradient("L"), "PNG")
    expect(422, lambda: decode_image(gray, resolution=8, channels=3, **LIMITS), "RGB (3 channels)", "mode L")


def npy(array) -> str:
    buf = io.BytesIO()
    np.save(buf, array)
    return base64.b64encode(buf.getvalue()).decode()


def test_latents_round_trip_as_float32():
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    got = decode_latents(npy(x), shape=(2, 1, 8, 8), max_bytes=1 << 20)
    assert got.dtype == np.float32 and np.array_equal(got, x)


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros((1, 1, 8, 8), np.float32), ["(2, 1, 8, 8)", "(1, 1, 8, 8)"]),
        (np.zeros((2, 1, 8, 8), np.int64), ["float", "int64"]),
        (np.full((2, 1, 8, 8), np.nan, np.float32), ["NaN"]),
    ],
)
def test_bad_latents_are_a_422_saying_why(array, words):
    error = expect(422, lambda: decode_latents(npy(array), shape=(2, 1, 8, 8), max_bytes=1 << 20), *words)
    assert error.details[0]["field"] == "latents"


def test_latents_never_unpickle():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    text = base64.b64encode(buf.getvalue()).decode()
    expect(422, lambda: decode_latents(text, shape=(1,), max_bytes=1 << 20))


def test_latents_header_declaring_a_huge_array_is_refused_without_allocating():
    header = io.BytesIO()  # magic + header of a 4-exabyte float32 array, and no data
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**6,) * 3}
    )
    text = base64.b64encode(header.getvalue()).decode()
    expect(422, lambda: decode_latents(text, shape=(2, 1, 8, 8), max_bytes=1 << 20), "expected shape")


def test_latents_that_are_not_npy_are_a_422():
    expect(422, lambda: decode_latents("!!!", shape=(1,), max_bytes=100), "base64")
    text = base64.b64encode(b"just some bytes").decode()
    expect(422, lambda: decode_latents(text, shape=(1,), max_bytes=100), ".npy")
