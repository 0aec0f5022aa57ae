"""Tensors to the bytes clients download: PNG per image, .npy per image, one grid PNG, base64 previews.

CPU-bound work that runs on the job runner's encoder threads, never on the engine loop or event loop.
"""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import torch

from app.images import make_grid, png_bytes, to_uint8

GRID = "grid.png"


def png_name(k: int) -> str:
    return f"{k}.png"


def npy_name(k: int) -> str:
    return f"{k}.npy"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encoding_failure(error: Exception) -> dict[str, str]:
    """The `error` of a job whose images or a preview could not be encoded: the exception's type, not its
    text (the server's log has that), as for the engine's own failures."""
    kind = type(error).__name__
    return {
        "code": "encoding_failed",
        "message": f"could not encode the job's images ({kind}); the server log has the details",
    }


class BrokenJobs:
    """Jobs failed because a preview could not be encoded while the engine still ran them: what the engine
    still sends for one is dropped, up to its last word (its end), which forgets it. Thread-safe."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def add(self, job_id: str) -> None:
        with self._lock:
            self._ids.add(job_id)

    def drops(self, job_id: str, ends: bool) -> bool:
        """Whether this update of the job (its end if `ends`) is to be dropped."""
        with self._lock:
            if job_id not in self._ids:
                return False
            if ends:
                self._ids.discard(job_id)
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)


def preview_pngs(x: torch.Tensor) -> list[str]:
    """(n, C, H, W) in model space -> n base64 PNG strings (values outside [-1, 1] are clipped)."""
    return [base64.b64encode(png_bytes(image)).decode("ascii") for image in to_uint8(x)]


def result_blobs(images: torch.Tensor, *, grid_columns: int | None = None) -> dict[str, bytes]:
    """Every downloadable result of a finished job: `k.png`, `k.npy` ((1, C, H, W) float32) and the grid.

    A job without images (likelihood: the engine hands over an empty tensor) has none.
    """
    if images.numel() == 0:
        return {}
    images = images.detach().to("cpu", torch.float32)
    blobs: dict[str, bytes] = {}
    for k, image in enumerate(to_uint8(images)):
        blobs[png_name(k)] = png_bytes(image)
    values = images.numpy()
    for k in range(values.shape[0]):
        blobs[npy_name(k)] = npy_bytes(values[k : k + 1])
    blobs[GRID] = png_bytes(make_grid(images, ncol=grid_columns))
    return blobs
