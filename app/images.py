"""Conversions between model tensors in [-1, 1] and 8-bit images (API.md's PNG mapping)."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 with round((x + 1) * 127.5) clipped to 0..255."""
    x = x.detach().to("cpu", torch.float32)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(a: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) or (N, H, W) uint8 -> (N, C, H, W) float32 in [-1, 1]."""
    if a.ndim == 3:
        a = a[..., None]
    return torch.from_numpy(np.array(a, copy=True)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def make_grid(x: torch.Tensor, *, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) in [-1, 1] into one (H', W', C) uint8 image, `ncol` columns (default ~√N)."""
    images = to_uint8(x)
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, ncol)
        y, xx = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, xx : xx + w] = image
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """One (H, W, C) uint8 image as PNG bytes."""
    buf = io.BytesIO()
    _pil(image).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str, image: np.ndarray) -> None:
    _pil(image).save(path, format="PNG")
