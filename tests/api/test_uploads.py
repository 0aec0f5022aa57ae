"""Uploaded images and latents: what decodes, and the 400/422 a client gets for everything else."""

from __future__ import annotations

import base64
import io
import pathlib
import struct
import zlib

import numpy as np
import pytest
from numpy.lib import format as npy_format
from PIL import Image

from app.api.errors import ApiError
from app.api.schemas import MAX_LATENT_ABS
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
    limits = {"max_bytes": 1000, "max_pixels": 10**6}
    expect(400, lambda: decode_image("A" * 4000, resolution=8, channels=1, **limits), "limit")
    # Not base64 at all: only a refusal by length, before decoding, names the limit rather than the base64.
    error = expect(
        400, lambda: decode_image("!" * 4000, resolution=8, channels=1, **limits), "1000-byte limit"
    )
    assert "base64" not in error.message


def test_wrong_size_is_a_422_naming_the_expected_size():
    text = encode(gradient("L", 16), "PNG")
    error = expect(422, lambda: decode_image(text, resolution=8, channels=1, **LIMITS), "8×8", "16×16")
    assert error.details[0]["field"] == "image"


def test_a_colour_image_for_a_grayscale_model_is_a_422_saying_where_the_colour_is():
    rgb = encode(gradient("RGB"), "PNG")
    error = expect(
        422,
        lambda: decode_image(rgb, resolution=8, channels=1, **LIMITS),
        "expected a grayscale (1 channel) image",
        "has colour: 64 of 64 pixels",
        "x=0, y=0: r=0, g=255, b=128",
    )
    assert error.details[0]["field"] == "image"


def test_modes_no_model_takes_are_a_422_naming_the_mode():
    cmyk = encode(Image.new("CMYK", (8, 8)), "JPEG")
    expect(422, lambda: decode_image(cmyk, resolution=8, channels=3, **LIMITS), "RGB (3 channels)", "CMYK")
    expect(422, lambda: decode_image(cmyk, resolution=8, channels=1, **LIMITS), "grayscale", "CMYK")


# Greyscale in every container, for 1-channel models (and for 3-channel ones)


def grey_pixels(size: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)


def as_rgb(grey: np.ndarray, alpha: int | None = None) -> Image.Image:
    planes = [grey] * 3 + ([np.full_like(grey, alpha)] if alpha is not None else [])
    return Image.fromarray(np.stack(planes, axis=-1), mode="RGBA" if alpha is not None else "RGB")


def in_model_space(grey: np.ndarray) -> np.ndarray:
    return (grey.astype(np.float32) / 127.5 - 1)[None]


@pytest.mark.parametrize(
    ("image", "fmt", "kwargs"),
    [
        (Image.fromarray(grey_pixels(), mode="L"), "WEBP", {"lossless": True}),  # Pillow decodes it as RGB
        (as_rgb(grey_pixels()), "PNG", {}),
        (as_rgb(grey_pixels(), alpha=255), "PNG", {}),  # fully opaque alpha carries nothing: dropped
        (as_rgb(grey_pixels(), alpha=255), "WEBP", {"lossless": True}),
        (Image.fromarray(grey_pixels(), mode="L").convert("P"), "PNG", {}),  # a grey palette
        (Image.fromarray(grey_pixels(), mode="L").convert("LA"), "PNG", {}),
    ],
    ids=["webp-L", "png-rgb", "png-rgba-opaque", "webp-rgba-opaque", "png-palette", "png-LA-opaque"],
)
def test_an_image_whose_channels_are_all_equal_is_exactly_its_grey_for_a_1_channel_model(image, fmt, kwargs):
    x = decode_image(encode(image, fmt, **kwargs), resolution=8, channels=1, **LIMITS)
    assert x.shape == (1, 8, 8) and x.dtype == np.float32
    np.testing.assert_array_equal(x, in_model_space(grey_pixels()))


def test_a_lossy_webp_of_a_grey_image_is_accepted_despite_the_codecs_rounding():
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # smooth, so lossy coding keeps it close
    text = encode(Image.fromarray(grey, mode="L"), "WEBP", quality=95)
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))
    assert (rgb.max(axis=-1) - rgb.min(axis=-1)).max() >= 1  # the channels are not all equal
    x = decode_image(text, resolution=64, channels=1, **LIMITS)
    assert x.shape == (1, 64, 64)
    assert np.abs(x - in_model_space(grey)).max() < 8 / 127.5  # within a few levels of the original


def test_colour_beyond_codec_rounding_in_a_lossy_webp_is_refused():
    text = encode(gradient("RGB"), "WEBP", quality=95)
    expect(422, lambda: decode_image(text, resolution=8, channels=1, **LIMITS), "has colour", "more than 2")


def test_a_png_whose_channels_differ_by_one_level_is_colour():  # lossless formats get no tolerance
    rgb = np.stack([grey_pixels()] * 3, axis=-1)
    rgb[3, 5, 1] ^= 1
    text = encode(Image.fromarray(rgb, mode="RGB"), "PNG")
    expect(
        422, lambda: decode_image(text, resolution=8, channels=1, **LIMITS), "has colour: 1 of 64", "x=5, y=3"
    )


def test_16_bit_grayscale_maps_to_8_bits_by_its_high_byte():
    wide = np.random.default_rng(1).integers(0, 65536, (8, 8)).astype(np.uint16)
    wide[0, :4] = [0, 255, 65280, 65535]
    text = encode(Image.fromarray(wide), "PNG")
    assert Image.open(io.BytesIO(base64.b64decode(text))).mode == "I;16"
    x = decode_image(text, resolution=8, channels=1, **LIMITS)
    np.testing.assert_array_equal(x, in_model_space((wide >> 8).astype(np.uint8)))
    assert list(x[0, 0, :4]) == [-1.0, -1.0, 1.0, 1.0]
    # 8-bit values stored as 16 bits (x · 257) come back exactly
    exact = encode(Image.fromarray(grey_pixels().astype(np.uint16) * 257), "PNG")
    np.testing.assert_array_equal(
        decode_image(exact, resolution=8, channels=1, **LIMITS), in_model_space(grey_pixels())
    )


@pytest.mark.parametrize(
    ("image", "kwargs", "count"),
    [
        (as_rgb(grey_pixels(), alpha=254), {}, 64),
        (Image.new("LA", (8, 8), (10, 0)), {}, 64),
        (Image.fromarray(np.eye(8, dtype=np.uint8) * 200, mode="L"), {"transparency": 200}, 8),  # tRNS
        (Image.fromarray(np.eye(8, dtype=np.uint16) * 300), {"transparency": 300}, 8),  # 16-bit tRNS
    ],
    ids=["rgba", "la", "L-trns", "I16-trns"],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_transparency_is_refused_rather_than_flattened_onto_a_guessed_background(
    image, kwargs, count, channels
):
    text = encode(image, "PNG", **kwargs)
    error = expect(
        422,
        lambda: decode_image(text, resolution=8, channels=channels, **LIMITS),
        f"has transparency: {count} of 64 pixels are not fully opaque",
        "flatten",
    )
    assert error.details[0]["field"] == "image"


def test_a_3_channel_model_takes_greyscale_as_equal_channels_and_opaque_rgba_as_rgb():
    grey = grey_pixels()
    for text in (
        encode(Image.fromarray(grey, mode="L"), "PNG"),
        encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
        encode(as_rgb(grey, alpha=255), "PNG"),
    ):
        x = decode_image(text, resolution=8, channels=3, **LIMITS)
        np.testing.assert_array_equal(x, np.repeat(in_model_space(grey), 3, axis=0))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_an_animation_is_refused_rather_than_cut_to_its_first_frame(fmt):
    frames = [Image.new("L", (8, 8), value) for value in (0, 100, 200)]
    text = encode(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
    expect(422, lambda: decode_image(text, resolution=8, channels=1, **LIMITS), "animation of 3 frames")


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
        (np.full((2, 1, 8, 8), 1e30, np.float32), ["within ±1000", "got 1e+30", "N(0, I)"]),
        (np.full((2, 1, 8, 8), -1e300, np.float64), ["within ±1000", "got 1e+300"]),  # not called infinite
        (np.full((2, 1, 8, 8), 1000.5, np.float32), ["within ±1000", "got 1000.5"]),
    ],
)
def test_bad_latents_are_a_422_saying_why(array, words):
    error = expect(422, lambda: decode_latents(npy(array), shape=(2, 1, 8, 8), max_bytes=1 << 20), *words)
    assert error.details[0]["field"] == "latents"


def test_latents_up_to_the_bound_are_accepted():
    x = np.full((1, 1, 2, 2), -MAX_LATENT_ABS, np.float32)
    assert np.array_equal(decode_latents(npy(x), shape=(1, 1, 2, 2), max_bytes=1 << 20), x)
    error = expect(422, lambda: decode_latents(npy(x), shape=(1, 1, 2, 2), max_bytes=1 << 20, max_abs=10))
    assert "within ±10" in error.message


class _Touch:
    """Unpickling it creates a file: proof that a payload ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def test_latents_never_unpickle(tmp_path):
    ran = tmp_path / "the payload ran"
    buf = io.BytesIO()
    np.save(buf, np.array([_Touch(ran)], dtype=object), allow_pickle=True)
    np.load(io.BytesIO(buf.getvalue()), allow_pickle=True)  # the payload works where pickles are allowed
    assert ran.exists()
    ran.unlink()
    text = base64.b64encode(buf.getvalue()).decode()
    expect(422, lambda: decode_latents(text, shape=(1,), max_bytes=1 << 20))
    assert not ran.exists()


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
    # A header numpy cannot parse: version 1.0/2.0 headers go through `tokenize`, whose TokenError on an
    # unclosed bracket is neither a ValueError nor an OSError.
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 8, 8\n"
    broken = npy_format.MAGIC_PREFIX + bytes([1, 0]) + len(header).to_bytes(2, "little") + header
    for data in (broken, broken + b"\0" * 256):
        text = base64.b64encode(data).decode()
        expect(422, lambda text=text: decode_latents(text, shape=(1, 1, 8, 8), max_bytes=1000), ".npy")
