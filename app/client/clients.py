"""`Client` and `AsyncClient`: the same operations (see `flows`), performed with blocking or awaited I/O."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Unpack

import httpx
import numpy as np
from PIL import Image

from app.client.bodies import (
    ImageLike,
    InterpolateOptions,
    JobImage,
    LikelihoodOptions,
    ReconstructOptions,
    SampleOptions,
    Source,
    id_of,
    interpolate_body,
    likelihood_body,
    reconstruct_body,
    sample_body,
)
from app.client.flows import ANSWER_ERRORS, BaseClient, Call, EventStream, Flow, T
from app.client.results import DDPMError, Job, Model, Progress


class Client(BaseClient):
    """Synchronous client; use as a context manager (or call `close()`)."""

    _http: httpx.Client
    _transport = httpx.Client

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        """One call, retried on 429/503; the 2xx response, or a `DDPMError` for any other answer."""
        for attempt in range(self.retries + 1):
            try:
                response = self._http.send(self._request(call, stream), stream=stream)
            except httpx.TransportError as e:
                raise self._unreachable(e) from e
            if response.is_success:
                return response
            response.read()
            response.close()
            delay = self._delay(attempt, response)
            if delay is None:
                raise self._error(response, call, attempt + 1)
            time.sleep(delay)
        raise AssertionError("unreachable: the last attempt has no delay")

    def _run(self, flow: Flow[T]) -> T:
        try:
            call = next(flow)
            while True:
                response = self._send(call)
                try:
                    call = flow.send(response)
                except ANSWER_ERRORS as e:
                    raise self._bad_response(response, e) from e
        except StopIteration as finished:
            return finished.value

    def sample(self, n: int = 1, *, wait: bool = False, **options: Unpack[SampleOptions]) -> Job:
        """POST /sample: `n` images (Algorithm 2, or DDIM); `wait` = return once the job has ended."""
        return self._run(self._create("/sample", sample_body(n, options), wait))

    def interpolate(
        self, a: Source, b: Source, *, wait: bool = False, **options: Unpack[InterpolateOptions]
    ) -> Job:
        """POST /interpolate between two sources (seed, job image or image) at t, over `num` λ."""
        return self._run(self._create("/interpolate", interpolate_body(a, b, options), wait))

    def reconstruct(
        self, image: JobImage | ImageLike, *, wait: bool = False, **options: Unpack[ReconstructOptions]
    ) -> Job:
        """POST /reconstruct: `n` reverse runs from one x_t of the image (or of a job's image)."""
        return self._run(self._create("/reconstruct", reconstruct_body(image, options), wait))

    def likelihood(
        self, images: Sequence[ImageLike], *, wait: bool = False, **options: Unpack[LikelihoodOptions]
    ) -> Job:
        """POST /likelihood: the bound in bits/dim per image (`job.likelihood` once it succeeded)."""
        return self._run(self._create("/likelihood", likelihood_body(images, options), wait))

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
        events = EventStream(id_of(job), xt)
        while True:
            error = None
            try:
                response = self._send(events.call(), stream=True)
                try:
                    self._check_stream(response)
                    for line in response.iter_lines():
                        item = self._feed(events, line, response)
                        if item is not None:
                            yield item
                        if events.ended:
                            break
                finally:
                    response.close()
            except httpx.TransportError as e:  # the connection broke
                error = self._unreachable(e)
            except DDPMError as e:  # no connection: the server is away (restarting, deploying), or said no
                if not self._away(e):
                    raise
                error = e
            if events.failed:
                yield self.job(events.job_id)
            if events.ended:
                return
            time.sleep(self._reconnect_delay(events, error))

    def wait(self, job: Job | str) -> Job:
        """The job once it has ended, following its stream."""
        final = None
        for item in self.stream(job):
            final = item
        assert isinstance(final, Job)
        return final


class AsyncClient(BaseClient):
    """Asynchronous client with the methods of `Client`, awaited (`stream` is an async iterator)."""

    _http: httpx.AsyncClient
    _transport = httpx.AsyncClient

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = await self._http.send(self._request(call, stream), stream=stream)
            except httpx.TransportError as e:
                raise self._unreachable(e) from e
            if response.is_success:
                return response
            await response.aread()
            await response.aclose()
            delay = self._delay(attempt, response)
            if delay is None:
                raise self._error(response, call, attempt + 1)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt has no delay")

    async def _run(self, flow: Flow[T]) -> T:
        try:
            call = next(flow)
            while True:
                response = await self._send(call)
                try:
                    call = flow.send(response)
                except ANSWER_ERRORS as e:
                    raise self._bad_response(response, e) from e
        except StopIteration as finished:
            return finished.value

    async def sample(self, n: int = 1, *, wait: bool = False, **options: Unpack[SampleOptions]) -> Job:
        """See `Client.sample`."""
        return await self._run(self._create("/sample", sample_body(n, options), wait))

    async def interpolate(
        self, a: Source, b: Source, *, wait: bool = False, **options: Unpack[InterpolateOptions]
    ) -> Job:
        """See `Client.interpolate`."""
        return await self._run(self._create("/interpolate", interpolate_body(a, b, options), wait))

    async def reconstruct(
        self, image: JobImage | ImageLike, *, wait: bool = False, **options: Unpack[ReconstructOptions]
    ) -> Job:
        """See `Client.reconstruct`."""
        return await self._run(self._create("/reconstruct", reconstruct_body(image, options), wait))

    async def likelihood(
        self, images: Sequence[ImageLike], *, wait: bool = False, **options: Unpack[LikelihoodOptions]
    ) -> Job:
        """See `Client.likelihood`."""
        return await self._run(self._create("/likelihood", likelihood_body(images, options), wait))

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
        events = EventStream(id_of(job), xt)
        while True:
            error = None
            try:
                response = await self._send(events.call(), stream=True)
                try:
                    self._check_stream(response)
                    async for line in response.aiter_lines():
                        item = self._feed(events, line, response)
                        if item is not None:
                            yield item
                        if events.ended:
                            break
                finally:
                    await response.aclose()
            except httpx.TransportError as e:
                error = self._unreachable(e)
            except DDPMError as e:
                if not self._away(e):
                    raise
                error = e
            if events.failed:
                yield await self.job(events.job_id)
            if events.ended:
                return
            await asyncio.sleep(self._reconnect_delay(events, error))

    async def wait(self, job: Job | str) -> Job:
        final = None
        async for item in self.stream(job):
            final = item
        assert isinstance(final, Job)
        return final
