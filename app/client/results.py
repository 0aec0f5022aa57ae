"""What the client returns: typed jobs, progress events, models, bounds, and `DDPMError`."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import numpy as np
from PIL import Image

TERMINAL = ("succeeded", "failed", "cancelled")


class DDPMError(Exception):
    """An error answer of the API (`{"error": {"code", "message"}}`), or status 0 when none came."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        attempts: int = 1,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.attempts = attempts

    def __str__(self) -> str:
        where = f"HTTP {self.status} {self.code}" if self.status else self.code
        tries = f", after {self.attempts} attempts" if self.attempts > 1 else ""
        return f"{self.message} ({where}{tries})"


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


@dataclass(frozen=True)
class Likelihood:
    """The variational bound per image in bits/dim and its terms (eq. 5 of Ho et al. 2020)."""

    bits_per_dim: list[float]
    prior: list[float]
    diffusion: list[float]
    decoder: list[float]
    curve: dict[str, Any] | None = None


@dataclass(frozen=True)
class Job:
    """A job as `GET /jobs/{id}` shows it; `raw` is the JSON object itself."""

    id: str
    kind: str
    model: str
    status: str
    step: int
    steps: int
    seed: int | None
    queue_position: int | None
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: dict[str, str] | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Job:
        return cls(
            id=data["id"],
            kind=data["kind"],
            model=data["model"],
            status=data["status"],
            step=data["progress"]["step"],
            steps=data["progress"]["steps"],
            seed=data.get("seed"),
            queue_position=data.get("queue_position"),
            params=data.get("params") or {},
            result=data.get("result"),
            error=data.get("error"),
            created_at=_time(data.get("created_at")),
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
            raw=data,
        )

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def image_count(self) -> int:
        return len((self.result or {}).get("images") or [])

    @property
    def likelihood(self) -> Likelihood | None:
        """The bound of a succeeded likelihood job; None otherwise."""
        if self.kind != "likelihood" or not self.result:
            return None
        terms = self.result["terms"]
        return Likelihood(
            self.result["bits_per_dim"],
            terms["prior"],
            terms["diffusion"],
            terms["decoder"],
            self.result.get("curve"),
        )


@dataclass(frozen=True)
class Progress:
    """A `progress` event of `/stream/{id}`: the prediction x̂₀ after `step` of `steps`, at timestep t."""

    id: int | None
    step: int
    steps: int
    t: int
    x0: list[Image.Image]  # empty once the job's stored previews reached DDPM_MAX_PREVIEW_BYTES
    xt: list[Image.Image] | None = None
    budget_exhausted: bool = False  # the server sends no more preview images for this job

    def x0_array(self) -> np.ndarray | None:
        """x̂₀ as float32 (n, C, H, W) in [-1, 1] (8-bit precision: previews travel as PNG); None when the
        event carries no images (`budget_exhausted`)."""
        return to_array(self.x0) if self.x0 else None


@dataclass(frozen=True)
class Model:
    """One entry of `GET /models`."""

    name: str
    default: bool
    resolution: int
    channels: int
    timesteps: int
    beta_schedule: str
    variance: str
    parameters: int
    source: str
    max_steps: int | None = None  # the most steps a request may run (None: a server older than the field)


def to_array(images: Sequence[Image.Image]) -> np.ndarray:
    """PIL images -> float32 (n, C, H, W) in [-1, 1] (API.md's PNG mapping, inverted)."""
    arrays = [np.asarray(image, dtype=np.float32) for image in images]
    stacked = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
    return (stacked / 127.5 - 1.0).transpose(0, 3, 1, 2)


def decode_png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def error_from_response(response: httpx.Response, attempts: int) -> DDPMError:
    try:
        error = response.json()["error"]
        return DDPMError(
            response.status_code,
            error["code"],
            error["message"],
            details=error.get("details"),
            attempts=attempts,
        )
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:200] or response.reason_phrase
        return DDPMError(response.status_code, "http_error", text, attempts=attempts)
