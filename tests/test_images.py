import io

import numpy as np
import torch
from PIL import Image

from app.images import from_uint8, make_grid, png_bytes, to_uint8


def test_png_mapping_is_api_md_rounding():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.7, -3.0]).view(1, 1, 1, 7)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255, 0]


def test_uint8_round_trip_is_exact():
    a = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    assert (to_uint8(from_uint8(a)) == a).all()


def test_grid_layout_and_png():
    x = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 0.0, 1.0)])
    grid = make_grid(x, ncol=2, pad=1)
    assert grid.shape == (2 * 5 + 1, 2 * 5 + 1, 3)
    assert grid[1, 1, 0] == 0 and grid[1, 6, 0] == 128 and grid[6, 1, 0] == 255
    assert grid[6, 6, 0] == 0  # the empty fourth cell stays background
    im = Image.open(io.BytesIO(png_bytes(grid)))
    assert im.format == "PNG" and im.size == (11, 11)
    grey = make_grid(x[:, :1])
    assert Image.open(io.BytesIO(png_bytes(grey))).mode == "L"
