import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from app.training.data import SHARED_MNIST, DataError, load_images, pad_to, read_idx

MNIST = str(SHARED_MNIST)


def _write_idx(path, array: np.ndarray, *, compress: bool) -> None:
    raw = (
        b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    )
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip_gzip_or_not(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 7), dtype=np.uint8)
    labels = np.arange(5, dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", images, compress=compress)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress=compress)
    x, y = load_images(tmp_path, with_labels=True)
    assert x.shape == (5, 1, 6, 7)
    assert y.tolist() == list(range(5))
    np.testing.assert_array_equal(((x[:, 0] + 1) * 127.5).round().numpy().astype(np.uint8), images)


def test_shared_mnist_reads_as_10k_digits_in_range():
    x, y = load_images(MNIST, with_labels=True)
    assert x.shape == (10_000, 1, 28, 28)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert y.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_idx_errors_name_the_problem(tmp_path):
    bad = tmp_path / "x-images-idx3-ubyte"
    bad.write_bytes(b"hello world")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad)
    short = tmp_path / "short-images-idx3-ubyte"
    short.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 10, 28, 28) + b"\x00" * 100)
    with pytest.raises(DataError, match="file has 100"):
        read_idx(short)
    corrupt = tmp_path / "c-images-idx3-ubyte.gz"
    corrupt.write_bytes(b"\x1f\x8b" + b"\x00" * 20)
    with pytest.raises(DataError, match="corrupt gzip"):
        read_idx(corrupt)


def test_mismatched_labels_rejected(tmp_path):
    _write_idx(tmp_path / "a-images-idx3-ubyte", np.zeros((4, 2, 2), np.uint8), compress=False)
    _write_idx(tmp_path / "a-labels-idx1-ubyte", np.zeros((3,), np.uint8), compress=False)
    with pytest.raises(DataError, match="3 labels for 4 images"):
        load_images(tmp_path, with_labels=True)


def test_image_folder_rgb_and_errors(tmp_path):
    for k in range(3):
        Image.new("RGB", (8, 8), (k * 100, 0, 255)).save(tmp_path / f"{k}.png")
    x = load_images(tmp_path)
    assert x.shape == (3, 3, 8, 8)
    assert float(x[2, 0, 0, 0]) == pytest.approx(200 / 127.5 - 1)
    Image.new("RGB", (9, 8)).save(tmp_path / "odd.png")
    with pytest.raises(DataError, match="differ in size"):
        load_images(tmp_path)
    (tmp_path / "odd.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="unreadable image"):
        load_images(tmp_path)


def test_npz_nchw_and_nhwc(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (4, 3, 5, 5), dtype=np.uint8)
    np.savez(tmp_path / "nchw.npz", images=a, labels=np.arange(4))
    np.savez(tmp_path / "nhwc.npz", x=a.transpose(0, 2, 3, 1))
    x1, y1 = load_images(tmp_path / "nchw.npz", with_labels=True)
    x2 = load_images(tmp_path / "nhwc.npz")
    assert x1.shape == x2.shape == (4, 3, 5, 5)
    assert (x1 == x2).all() and y1.tolist() == [0, 1, 2, 3]
    np.savez(tmp_path / "float.npz", images=a.astype(np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_images(tmp_path / "float.npz")
    np.savez(tmp_path / "nokey.npz", other=a)
    with pytest.raises(DataError, match="no 'images'"):
        load_images(tmp_path / "nokey.npz")


def test_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_images(tmp_path / "nope")
    with pytest.raises(DataError, match="no images"):
        load_images(tmp_path)


def test_pad_to_32_keeps_digit_centred_on_background():
    x = load_images(MNIST)[:2]
    p = pad_to(x, 32)
    assert p.shape == (2, 1, 32, 32)
    assert (p[:, :, 2:30, 2:30] == x).all()
    assert (p[:, :, :2] == -1).all() and (p[:, :, :, 30:] == -1).all()
    with pytest.raises(DataError, match="cannot pad"):
        pad_to(x, 20)


def test_a_folder_of_all_four_mnist_files_reads_the_training_set(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):  # t10k-* sorts first
        _write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 4, 4), np.uint8),
            compress=True,
        )
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8), compress=True)
    with caplog.at_level("INFO", logger="app.training.data"):
        x, y = load_images(tmp_path, with_labels=True)
    assert x.shape == (5, 1, 4, 4) and y.tolist() == list(range(5))
    assert "train-images-idx3-ubyte.gz (5 images)" in caplog.text
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (tmp_path / name).rename(tmp_path / name.replace("train", "other"))
    with pytest.raises(DataError, match=r"2 '\*images-idx\*' files .* which to read is unclear"):
        load_images(tmp_path)


def test_the_shared_test_set_folder_still_reads_and_says_which_file(caplog):
    with caplog.at_level("INFO", logger="app.training.data"):
        assert len(load_images(MNIST)) == 10_000
    assert "t10k-images-idx3-ubyte.gz (10000 images)" in caplog.text


def test_a_labels_file_given_as_images_is_refused(tmp_path):
    _write_idx(tmp_path / "labels-idx1-ubyte", np.arange(5, dtype=np.uint8), compress=False)
    with pytest.raises(
        DataError, match=r"expected \(N, H, W\) uint8 images, got \(5,\) uint8 \(a labels file\?\)"
    ):
        load_images(tmp_path / "labels-idx1-ubyte")
