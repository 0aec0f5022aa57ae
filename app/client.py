"""A Python client for ddpm-serve (docs/API.md), synchronous and asynchronous, on httpx.

    from app.client import Client, Progress

    with Client("http://127.0.0.1:8000") as ddpm:  # API key: api_key=… or $DDPM_API_KEY
        job = ddpm.sample(n=4, steps=100, sampler="ddim", seed=1, stream_every=10)
        for event in ddpm.stream(job):  # x̂₀ previews, then the final job
            if isinstance(event, Progress):
                print(f"step {event.step}/{event.steps}, t = {event.t}", event.x0[0].size)
            else:
                job = event
        images = ddpm.images(job)  # float32 (4, C, H, W) in [-1, 1]
        row = ddpm.interpolate((job, 0), (job, 1), t=500, num=8, wait=True)
        ddpm.grid(row).save("row.png")

    async with AsyncClient("http://127.0.0.1:8000") as ddpm:  # the same methods, awaited
        job = await ddpm.sample(n=4, steps=50, wait=True)
        async for event in ddpm.stream(job): ...

Every failure is a `DDPMError(status, code, message)` carrying the API's JSON error (status 0 when the
server could not be reached). A 429 (queue full) or 503 (not ready) is retried with exponential
backoff, waiting the `Retry-After` the server sends when it sends one.

Each operation is written once, as a generator that yields the HTTP calls it needs and receives their
responses (`Flow`); `Client` and `AsyncClient` only differ in how they perform a call and sleep.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import os
import time
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypedDict, TypeVar, Unpack

import httpx
import numpy as np
from PIL import Image

__all__ = [
    "AsyncClient",
    "Client",
    "DDPMError",
    "Job",
    "Likelihood",
    "Model",
    "Progress",
]

T = TypeVar("T")
TERMINAL = ("succeeded", "failed", "cancelled")
RETRY_STATUSES = (429, 503)
MAX_BACKOFF_SECONDS = 30.0
# The server sends a heartbeat at least every 15 s (API.md), so a quiet stream this long is dead.
STREAM_READ_TIMEOUT = 45.0

ImageLike = Image.Image | np.ndarray | bytes | str | Path
"""An image to upload: a PIL image, a float (C, H, W) array in [-1, 1], encoded PNG/JPEG/WebP bytes, or
the path of such a file."""


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


# Results


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
    x0: list[Image.Image]
    xt: list[Image.Image] | None = None

    def x0_array(self) -> np.ndarray:
        """x̂₀ as float32 (n, C, H, W) in [-1, 1] (8-bit precision: previews travel as PNG)."""
        return _to_array(self.x0)


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


# Conversions


def _to_array(images: Sequence[Image.Image]) -> np.ndarray:
    """PIL images -> float32 (n, C, H, W) in [-1, 1] (API.md's PNG mapping, inverted)."""
    arrays = [np.asarray(image, dtype=np.float32) for image in images]
    stacked = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
    return (stacked / 127.5 - 1.0).transpose(0, 3, 1, 2)


def _decode_png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png_b64(image: ImageLike) -> str:
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


def _job_id(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else job


JobImage = Job | tuple[Job | str, int]
"""An image of an earlier job: the job itself (its image 0) or `(job or id, k)`."""


def _job_image(source: JobImage) -> dict[str, Any]:
    job, index = (source, 0) if isinstance(source, Job) else source
    return {"job": _job_id(job), "index": int(index)}


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
    return {"image": _png_b64(value)}


def _body(**fields: Any) -> dict[str, Any]:
    """A request body without the options left unset, so that the server's defaults apply."""
    return {k: v for k, v in fields.items() if v is not None}


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _error(response: httpx.Response, attempts: int) -> DDPMError:
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


def _sample_body(n: int, options: SampleOptions) -> dict[str, Any]:
    latents = options.get("latents")
    return _body(n=n, **{**options, "latents": None if latents is None else _npy_b64(latents)})


def _interpolate_body(a: Source, b: Source, options: InterpolateOptions) -> dict[str, Any]:
    return _body(a=_source(a), b=_source(b), **options)


def _reconstruct_body(image: JobImage | ImageLike, options: ReconstructOptions) -> dict:
    where = _job_image(image) if isinstance(image, Job | tuple) else {"image": _png_b64(image)}
    return _body(**where, **options)


def _likelihood_body(images: Sequence[ImageLike], options: LikelihoodOptions) -> dict[str, Any]:
    return _body(images=[_png_b64(image) for image in images], **options)


# One call, one stream


@dataclass(frozen=True)
class Call:
    """An HTTP call an operation needs; `wait` = the server holds it until the job ends (no read timeout)."""

    method: str
    path: str
    json: Any = None
    params: dict[str, str] | None = None
    headers: dict[str, str] | None = None
    wait: bool = False


Flow = Generator[Call, httpx.Response, T]


class _EventStream:
    """Turns the lines of `/stream/{id}` into `Progress` and `Job` items; knows where to resume."""

    def __init__(self, job_id: str, xt: bool):
        self.job_id = job_id
        self.xt = xt
        self.last_id: int | None = None
        self.ended = False  # done or error seen
        self.failed = False  # error seen: the final job must be fetched
        self._fields: dict[str, str] = {}

    def call(self) -> Call:
        headers = {"Accept": "text/event-stream"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = str(self.last_id)
        return Call(
            "GET", f"/stream/{self.job_id}", params={"xt": "true"} if self.xt else None, headers=headers
        )

    def feed(self, line: str) -> Progress | Job | None:
        if line.startswith(":"):
            return None  # a heartbeat
        if line:
            name, _, value = line.partition(":")
            self._fields[name] = value.removeprefix(" ")
            return None
        fields, self._fields = self._fields, {}
        if not fields:
            return None
        if fields.get("id", "").isdigit():
            self.last_id = int(fields["id"])
        data = json.loads(fields.get("data") or "null")
        event = fields.get("event", "message")
        if event == "progress":
            xt = data.get("xt")
            return Progress(
                id=self.last_id,
                step=data["step"],
                steps=data["steps"],
                t=data["t"],
                x0=[_decode_png(text) for text in data["x0"]],
                xt=[_decode_png(text) for text in xt] if xt else None,
            )
        if event == "done":
            self.ended = True
            return Job.from_api(data)
        if event == "error":
            self.ended = self.failed = True
        return None


# Shared behaviour


class _Base:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
    ):
        """`retries`: how often a 429/503 (or a dropped stream) is retried, waiting `Retry-After` or else
        `backoff` × 2^attempt seconds (at most 30); `timeout`: seconds per request (connect, read)."""
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        api_key = api_key if api_key is not None else os.environ.get("DDPM_API_KEY")
        self.headers = {"User-Agent": "ddpm-serve-client/0.1"}
        if api_key:
            self.headers["X-API-Key"] = api_key

    def _timeout(self, call: Call, stream: bool) -> httpx.Timeout:
        if call.wait:
            return httpx.Timeout(self.timeout, read=None)
        if stream:
            return httpx.Timeout(self.timeout, read=max(self.timeout, STREAM_READ_TIMEOUT))
        return httpx.Timeout(self.timeout)

    def _request(
        self, http: httpx.Client | httpx.AsyncClient, call: Call, stream: bool = False
    ) -> httpx.Request:
        return http.build_request(
            call.method,
            call.path,
            json=call.json,
            params=call.params,
            headers=call.headers,
            timeout=self._timeout(call, stream),
        )

    def _delay(self, attempt: int, response: httpx.Response | None = None) -> float | None:
        """Seconds to wait before retry `attempt + 1`, or None when it is not to be retried."""
        if attempt >= self.retries:
            return None
        if response is not None:
            if response.status_code not in RETRY_STATUSES:
                return None
            after = _retry_after(response.headers.get("Retry-After"))
            if after is not None:
                return after
        return min(self.backoff * 2**attempt, MAX_BACKOFF_SECONDS)

    def _unreachable(self, error: httpx.TransportError) -> DDPMError:
        if isinstance(error, httpx.TimeoutException):
            return DDPMError(0, "timeout", f"{self.url} did not answer in time ({error!r})")
        return DDPMError(0, "unreachable", f"cannot reach {self.url}: {error}")

    # Operations, each written once

    @staticmethod
    def _create(path: str, body: dict[str, Any], wait: bool) -> Flow[Job]:
        response = yield Call("POST", path, json=body, params={"wait": "true"} if wait else None, wait=wait)
        return Job.from_api(response.json())

    @staticmethod
    def _get_job(method: str, job: Job | str) -> Flow[Job]:
        response = yield Call(method, f"/jobs/{_job_id(job)}")
        return Job.from_api(response.json())

    @staticmethod
    def _models() -> Flow[list[Model]]:
        response = yield Call("GET", "/models")
        return [Model(**{k: entry[k] for k in Model.__dataclass_fields__}) for entry in response.json()]

    @staticmethod
    def _images(job: Job | str, as_: Literal["array", "pil"]) -> Flow[np.ndarray | list[Image.Image]]:
        job_id = _job_id(job)
        if as_ == "array":
            response = yield Call("GET", f"/jobs/{job_id}/images.npy")
            return np.load(io.BytesIO(response.content), allow_pickle=False)
        if not isinstance(job, Job) or job.result is None:
            job = Job.from_api((yield Call("GET", f"/jobs/{job_id}")).json())
        images = []
        for k in range(job.image_count):
            response = yield Call("GET", f"/jobs/{job_id}/images/{k}.png")
            images.append(Image.open(io.BytesIO(response.content)))
        return images

    @staticmethod
    def _grid(job: Job | str) -> Flow[Image.Image]:
        response = yield Call("GET", f"/jobs/{_job_id(job)}/grid.png")
        return Image.open(io.BytesIO(response.content))


class Client(_Base):
    """Synchronous client; use as a context manager (or call `close()`)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", **kwargs: Any):
        super().__init__(url, **kwargs)
        self._http = httpx.Client(base_url=self.url, headers=self.headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        """One call, retried on 429/503; the response, or a `DDPMError` for an error answer."""
        for attempt in range(self.retries + 1):
            try:
                response = self._http.send(self._request(self._http, call, stream), stream=stream)
            except httpx.TransportError as e:
                raise self._unreachable(e) from e
            if not response.is_error:
                return response
            response.read()
            response.close()
            delay = self._delay(attempt, response)
            if delay is None:
                raise _error(response, attempt + 1)
            time.sleep(delay)
        raise AssertionError("unreachable: the last attempt has no delay")

    def _run(self, flow: Flow[T]) -> T:
        try:
            call = next(flow)
            while True:
                call = flow.send(self._send(call))
        except StopIteration as finished:
            return finished.value

    def sample(self, n: int = 1, *, wait: bool = False, **options: Unpack[SampleOptions]) -> Job:
        """POST /sample: `n` images (Algorithm 2, or DDIM); `wait` = return once the job has ended."""
        return self._run(self._create("/sample", _sample_body(n, options), wait))

    def interpolate(
        self, a: Source, b: Source, *, wait: bool = False, **options: Unpack[InterpolateOptions]
    ) -> Job:
        """POST /interpolate between two sources (seed, job image or image) at t, over `num` λ."""
        return self._run(self._create("/interpolate", _interpolate_body(a, b, options), wait))

    def reconstruct(
        self, image: JobImage | ImageLike, *, wait: bool = False, **options: Unpack[ReconstructOptions]
    ) -> Job:
        """POST /reconstruct: `n` reverse runs from one x_t of the image (or of a job's image)."""
        return self._run(self._create("/reconstruct", _reconstruct_body(image, options), wait))

    def likelihood(
        self, images: Sequence[ImageLike], *, wait: bool = False, **options: Unpack[LikelihoodOptions]
    ) -> Job:
        """POST /likelihood: the bound in bits/dim per image (`job.likelihood` once it succeeded)."""
        return self._run(self._create("/likelihood", _likelihood_body(images, options), wait))

    def job(self, job: Job | str) -> Job:
        """GET /jobs/{id}: the job as it is now."""
        return self._run(self._get_job("GET", job))

    def cancel(self, job: Job | str) -> Job:
        """DELETE /jobs/{id}: the job once it ended (`cancelled`, or its final status)."""
        return self._run(self._get_job("DELETE", job))

    def models(self) -> list[Model]:
        """GET /models: the loaded models, the default first."""
        return self._run(self._models())

    def images(self, job: Job | str) -> np.ndarray:
        """All images of a succeeded job, float32 (n, C, H, W) in [-1, 1], exactly as the model made them."""
        return self._run(self._images(job, "array"))

    def pil_images(self, job: Job | str) -> list[Image.Image]:
        """All images of a succeeded job as 8-bit PIL images."""
        return self._run(self._images(job, "pil"))

    def grid(self, job: Job | str) -> Image.Image:
        """All images of a succeeded job tiled into one PIL image."""
        return self._run(self._grid(job))

    def stream(self, job: Job | str, *, xt: bool = False) -> Iterator[Progress | Job]:
        """`Progress` events (x̂₀ previews, decoded), then the final `Job`; resumes if the connection drops."""
        events = _EventStream(_job_id(job), xt)
        for attempt in range(self.retries + 1):
            try:
                response = self._send(events.call(), stream=True)
                try:
                    for line in response.iter_lines():
                        item = events.feed(line)
                        if item is not None:
                            yield item
                        if events.ended:
                            break
                finally:
                    response.close()
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise self._unreachable(e) from e
            if events.failed:
                yield self.job(events.job_id)
            if events.ended:
                return
            time.sleep(self._delay(attempt) or 0.0)
        raise DDPMError(
            0, "stream_ended", f"the stream of job {events.job_id} kept closing before the job ended"
        )

    def wait(self, job: Job | str) -> Job:
        """The job once it has ended, following its stream."""
        final = None
        for item in self.stream(job):
            final = item
        assert isinstance(final, Job)
        return final


class AsyncClient(_Base):
    """Asynchronous client with the methods of `Client`, awaited (`stream` is an async iterator)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", **kwargs: Any):
        super().__init__(url, **kwargs)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = await self._http.send(self._request(self._http, call, stream), stream=stream)
            except httpx.TransportError as e:
                raise self._unreachable(e) from e
            if not response.is_error:
                return response
            await response.aread()
            await response.aclose()
            delay = self._delay(attempt, response)
            if delay is None:
                raise _error(response, attempt + 1)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt has no delay")

    async def _run(self, flow: Flow[T]) -> T:
        try:
            call = next(flow)
            while True:
                call = flow.send(await self._send(call))
        except StopIteration as finished:
            return finished.value

    async def sample(self, n: int = 1, *, wait: bool = False, **options: Unpack[SampleOptions]) -> Job:
        """See `Client.sample`."""
        return await self._run(self._create("/sample", _sample_body(n, options), wait))

    async def interpolate(
        self, a: Source, b: Source, *, wait: bool = False, **options: Unpack[InterpolateOptions]
    ) -> Job:
        """See `Client.interpolate`."""
        return await self._run(self._create("/interpolate", _interpolate_body(a, b, options), wait))

    async def reconstruct(
        self, image: JobImage | ImageLike, *, wait: bool = False, **options: Unpack[ReconstructOptions]
    ) -> Job:
        """See `Client.reconstruct`."""
        return await self._run(self._create("/reconstruct", _reconstruct_body(image, options), wait))

    async def likelihood(
        self, images: Sequence[ImageLike], *, wait: bool = False, **options: Unpack[LikelihoodOptions]
    ) -> Job:
        """See `Client.likelihood`."""
        return await self._run(self._create("/likelihood", _likelihood_body(images, options), wait))

    async def job(self, job: Job | str) -> Job:
        return await self._run(self._get_job("GET", job))

    async def cancel(self, job: Job | str) -> Job:
        return await self._run(self._get_job("DELETE", job))

    async def models(self) -> list[Model]:
        return await self._run(self._models())

    async def images(self, job: Job | str) -> np.ndarray:
        return await self._run(self._images(job, "array"))

    async def pil_images(self, job: Job | str) -> list[Image.Image]:
        return await self._run(self._images(job, "pil"))

    async def grid(self, job: Job | str) -> Image.Image:
        return await self._run(self._grid(job))

    async def stream(self, job: Job | str, *, xt: bool = False) -> AsyncIterator[Progress | Job]:
        """See `Client.stream`."""
        events = _EventStream(_job_id(job), xt)
        for attempt in range(self.retries + 1):
            try:
                response = await self._send(events.call(), stream=True)
                try:
                    async for line in response.aiter_lines():
                        item = events.feed(line)
                        if item is not None:
                            yield item
                        if events.ended:
                            break
                finally:
                    await response.aclose()
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise self._unreachable(e) from e
            if events.failed:
                yield await self.job(events.job_id)
            if events.ended:
                return
            await asyncio.sleep(self._delay(attempt) or 0.0)
        raise DDPMError(
            0, "stream_ended", f"the stream of job {events.job_id} kept closing before the job ended"
        )

    async def wait(self, job: Job | str) -> Job:
        final = None
        async for item in self.stream(job):
            final = item
        assert isinstance(final, Job)
        return final
