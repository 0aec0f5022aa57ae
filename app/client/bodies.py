"""Request bodies of API.md from Python values: images, sources, latents, and the options of each route."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
from PIL import Image

from app.client.results import Job

ImageLike = Image.Image | np.ndarray | bytes | str | Path
"""An image to upload: a PIL image, a float (C, H, W) array in [-1, 1], encoded PNG/JPEG/WebP bytes, or
the path of such a file."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_b64(image: ImageLike) -> str:
    """Any `ImageLike` as base64 for a request body (files and bytes are sent as they are)."""
    if isinstance(image, str | Path):
        return _b64(Path(image).read_bytes())
    if isinstance(image, bytes):
        return _b64(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3:
            raise ValueError(f"an image array must be (C, H, W) in [-1, 1], got shape {image.shape}")
        pixels = np.clip(np.round((image.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
        pixels = pixels.transpose(1, 2, 0)
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return _b64(buf.getvalue())


def _npy_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return _b64(buf.getvalue())


def id_of(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else job


JobImage = Job | tuple[Job | str, int]
"""An image of an earlier job: the job itself (its image 0) or `(job or id, k)`."""


def _job_image(source: JobImage) -> dict[str, Any]:
    job, index = (source, 0) if isinstance(source, Job) else source
    return {"job": id_of(job), "index": int(index)}


Source = int | JobImage | ImageLike | dict
"""An interpolation end: a seed (a fresh sample), a job's image (`job` = its image 0, or `(job, k)`), an
image to upload, or the API's own `{"image"|"seed"|"job": …}` object."""


def _source(value: Source) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, bool):
        raise TypeError("a source is a seed, a job image or an image, not a bool")
    if isinstance(value, int):
        return {"seed": value}
    if isinstance(value, Job | tuple):
        return _job_image(value)
    return {"image": png_b64(value)}


def _body(**fields: Any) -> dict[str, Any]:
    """A request body without the options left unset, so that the server's defaults apply."""
    return {k: v for k, v in fields.items() if v is not None}


# Request options (documented once, used by both clients)


class SampleOptions(TypedDict, total=False):
    """Fields of POST /sample besides `n` (API.md)."""

    model: str
    steps: int
    sampler: Literal["ddpm", "ddim"]
    eta: float
    variance: Literal["beta", "posterior", "model"]
    clip_denoised: bool
    seed: int
    latents: np.ndarray  # float32 (n, C, H, W): x_T to start from
    stream_every: int
    output: Literal["png", "npy"]


class InterpolateOptions(TypedDict, total=False):
    """Fields of POST /interpolate besides the two sources (give `num` or `lambdas`)."""

    model: str
    t: int | list[int]  # several t: one grid row each (Fig. 9)
    num: int
    lambdas: list[float]
    steps: int
    seed: int
    stream_every: int
    output: Literal["png", "npy"]


class ReconstructOptions(TypedDict, total=False):
    """Fields of POST /reconstruct besides the image."""

    model: str
    t: int
    n: int
    seed: int
    stream_every: int
    output: Literal["png", "npy"]


class LikelihoodOptions(TypedDict, total=False):
    """Fields of POST /likelihood besides the images."""

    model: str
    seed: int
    curve: bool


def sample_body(n: int, options: SampleOptions) -> dict[str, Any]:
    latents = options.get("latents")
    return _body(n=n, **{**options, "latents": None if latents is None else _npy_b64(latents)})


def interpolate_body(a: Source, b: Source, options: InterpolateOptions) -> dict[str, Any]:
    return _body(a=_source(a), b=_source(b), **options)


def reconstruct_body(image: JobImage | ImageLike, options: ReconstructOptions) -> dict:
    where = _job_image(image) if isinstance(image, Job | tuple) else {"image": png_b64(image)}
    return _body(**where, **options)


def likelihood_body(images: Sequence[ImageLike], options: LikelihoodOptions) -> dict[str, Any]:
    return _body(images=[png_b64(image) for image in images], **options)
