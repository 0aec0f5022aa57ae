"""Training data: MNIST-format IDX files, folders of images and .npz arrays, scaled to [-1, 1]."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from app.images import from_uint8

log = logging.getLogger(__name__)

# The MNIST test set the project trains its bundled model on: ../shared/data/mnist beside the checkout.
SHARED_MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4")}


class DataError(ValueError):
    """Unreadable or inconsistent training data; the message names the file and the problem."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzip-compressed or not."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from e
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header says shape {shape} ({expected} bytes), file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(folder: Path, kind: str) -> Path | None:
    """The one '*{kind}-idx*' file of the folder; of several, the one train-* file (MNIST's four files:
    train-* and t10k-*, and the training set is meant), else an error naming them."""
    hits = sorted(p for p in folder.iterdir() if kind in p.name and "idx" in p.name)
    if len(hits) <= 1:
        return hits[0] if hits else None
    train = [p for p in hits if p.name.startswith("train")]
    if len(train) == 1:
        return train[0]
    raise DataError(
        f"{folder}: {len(hits)} '*{kind}-idx*' files ({', '.join(p.name for p in hits)}) and not one train-* "
        "among them: which to read is unclear; give --data a folder holding one set"
    )


def _check_images(images: np.ndarray, path: Path) -> np.ndarray:
    if images.ndim != 3 or images.dtype != np.uint8:
        hint = " (a labels file?)" if images.ndim == 1 else ""
        raise DataError(f"{path}: expected (N, H, W) uint8 images, got {images.shape} {images.dtype}{hint}")
    return images


def _from_idx_folder(folder: Path) -> tuple[np.ndarray, np.ndarray | None]:
    images_path = _find_idx(folder, "images")
    if images_path is None:
        raise DataError(f"{folder}: no '*images-idx*' file")
    images = _check_images(read_idx(images_path), images_path)
    log.info("reading %s (%d images)", images_path, len(images))
    labels_path = _find_idx(folder, "labels")
    labels = None
    if labels_path is not None:
        labels = read_idx(labels_path)
        if labels.shape != (len(images),):
            raise DataError(f"{labels_path}: {labels.shape[0]} labels for {len(images)} images")
    return images, labels


def _from_image_folder(folder: Path) -> np.ndarray:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and no IDX files")
    arrays = []
    for p in files:
        try:
            with Image.open(p) as im:
                arrays.append(np.asarray(im.convert("L" if im.mode in ("L", "1", "P") else "RGB")))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{p}: unreadable image ({e})") from e
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"{folder}: images differ in size or channels: {sorted(shapes)[:4]}")
    return np.stack(arrays)


def _from_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable .npz ({e})") from e
    key = next((k for k in ("images", "x", "arr_0") if k in arrays), None)
    if key is None:
        raise DataError(f"{path}: no 'images', 'x' or 'arr_0' array (found {list(arrays)})")
    images = arrays[key]
    labels = next((arrays[k] for k in ("labels", "y") if k in arrays), None)
    if images.dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8 0..255, got {images.dtype}")
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if images.ndim not in (3, 4):
        raise DataError(f"{path}: images must be (N, H, W[, C]), got shape {images.shape}")
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise DataError(f"{path}: {labels.shape[0]} labels for {images.shape[0]} images")
    return images, labels


def load_images(path: str | Path, *, with_labels: bool = False):
    """Load a dataset as (N, C, H, W) float32 in [-1, 1] (and int64 labels, or None, if asked).

    `path` is a folder of IDX files (MNIST layout), a single IDX images file, a folder of
    images (all the same size), or an .npz with an 'images' array (uint8, NHWC or NCHW).
    """
    path = Path(path)
    labels = None
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        if any("idx" in p.name for p in path.iterdir()):
            images, labels = _from_idx_folder(path)
        else:
            images = _from_image_folder(path)
    elif path.suffix == ".npz":
        images, labels = _from_npz(path)
    else:
        images = _check_images(read_idx(path), path)
    if len(images) == 0:
        raise DataError(f"{path}: the dataset is empty")
    x = from_uint8(images)
    if not with_labels:
        return x
    return x, None if labels is None else torch.from_numpy(labels.astype(np.int64))


def pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad (N, C, H, W) images symmetrically with the background value -1 up to size × size."""
    h, w = x.shape[-2:]
    if size < max(h, w):
        raise DataError(f"cannot pad {h}×{w} images to {size}×{size}")
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top), value=-1.0)
