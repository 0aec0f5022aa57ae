"""What the sync and async clients share: the retry policy, the SSE decoder, and every operation
written once as a `Flow`, a generator that yields the HTTP calls it needs and receives their responses."""

from __future__ import annotations

import email.utils
import io
import json
import os
from collections.abc import Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import httpx
import numpy as np
from PIL import Image, UnidentifiedImageError

from app.client.bodies import id_of
from app.client.results import DDPMError, Job, Model, Progress, decode_png, error_from_response

T = TypeVar("T")
RETRY_STATUSES = (429, 503)
# What a proxy answers while the replica behind it restarts: a stream tries again (its own back-off).
GATEWAY_STATUSES = (502, 504)
# What reading an answer that is not the API's raises (a JSON document of another shape, an HTML page).
ANSWER_ERRORS = (ValueError, KeyError, TypeError, AttributeError, EOFError, UnidentifiedImageError)
MAX_BACKOFF_SECONDS = 30.0
# The server sends a heartbeat at least every 15 s (API.md), so a quiet stream this long is dead.
STREAM_READ_TIMEOUT = 45.0


def retry_after(value: str | None) -> float | None:
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


class EventStream:
    """Turns the lines of `/stream/{id}` into `Progress` and `Job` items; knows where to resume."""

    def __init__(self, job_id: str, xt: bool):
        self.job_id = job_id
        self.xt = xt
        self.last_id: int | None = None
        self.ended = False  # done or error seen
        self.failed = False  # error seen: the final job must be fetched
        self.heard = False  # this connection delivered a message (a heartbeat too)
        self.failures = 0  # connections in a row that delivered nothing
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
            self.heard = True
            return None  # a heartbeat
        if line:
            name, _, value = line.partition(":")
            self._fields[name] = value.removeprefix(" ")
            return None
        fields, self._fields = self._fields, {}
        if not fields:
            return None
        self.heard = True
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
                x0=[decode_png(text) for text in data["x0"]],
                xt=[decode_png(text) for text in xt] if xt else None,
                budget_exhausted=bool(data.get("preview_budget_exhausted", False)),
            )
        if event == "done":
            self.ended = True
            return Job.from_api(data)
        if event == "error":
            self.ended = self.failed = True
        return None


class BaseClient:
    """Settings, retry policy and operations shared by `Client` and `AsyncClient`."""

    _transport: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
    ):
        """`retries`: how often a 429/503 is retried, waiting `Retry-After` or else `backoff` × 2^attempt
        seconds (at most 30), and how often in a row a stream that broke or could not reconnect is opened
        again (a connection that delivered anything starts the count afresh); `timeout`: seconds per
        request (connect, read)."""
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        api_key = api_key if api_key is not None else os.environ.get("DDPM_API_KEY")
        self.headers = {"User-Agent": "ddpm-serve-client/0.1"}
        if api_key:
            self.headers["X-API-Key"] = api_key
        self._http = self._transport(base_url=self.url, headers=self.headers)

    def _timeout(self, call: Call, stream: bool) -> httpx.Timeout:
        if call.wait:
            return httpx.Timeout(self.timeout, read=None)
        if stream:
            return httpx.Timeout(self.timeout, read=max(self.timeout, STREAM_READ_TIMEOUT))
        return httpx.Timeout(self.timeout)

    def _request(self, call: Call, stream: bool = False) -> httpx.Request:
        return self._http.build_request(
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
            after = retry_after(response.headers.get("Retry-After"))
            if after is not None:
                return after
        return min(self.backoff * 2**attempt, MAX_BACKOFF_SECONDS)

    def _unreachable(self, error: httpx.TransportError) -> DDPMError:
        if isinstance(error, httpx.TimeoutException):
            return DDPMError(0, "timeout", f"{self.url} did not answer in time ({error!r})")
        return DDPMError(0, "unreachable", f"cannot reach {self.url}: {error}")

    def _error(self, response: httpx.Response, call: Call, attempts: int) -> DDPMError:
        """The `DDPMError` for an answer that is not a 2xx (read already)."""
        if not response.is_redirect:
            return error_from_response(response, attempts)
        # httpx follows no redirects: the client's URL is not the server's (http for https, a moved host).
        target = str(response.request.url.join(response.headers["Location"]).copy_with(query=None))
        if target.endswith(call.path):  # the same path elsewhere: the server's URL is the rest
            advice = f"use {target.removesuffix(call.path)}"
        else:
            advice = f"is {self.url} the server's URL?"
        asked = response.request.url.copy_with(query=None)
        return DDPMError(
            response.status_code,
            "redirect",
            f"the server redirects {asked} to {target}; {advice}",
            attempts=attempts,
        )

    def _bad_response(self, response: httpx.Response, error: Exception) -> DDPMError:
        """A 2xx answer the client cannot read as the API's: another server at that URL, a proxy's page, or a
        server of another version (the error it raised is named, so a fault of the client's shows too)."""
        kind = response.headers.get("Content-Type", "no Content-Type")
        return DDPMError(
            response.status_code,
            "bad_response",
            f"could not read the answer of {response.request.url} ({kind}; {type(error).__name__}: {error}); "
            f"is {self.url} a ddpm-serve server, of a version this client knows?",
        )

    def _check_stream(self, response: httpx.Response) -> None:
        kind = response.headers.get("Content-Type", "")
        if not kind.startswith("text/event-stream"):
            not_sse = ValueError(f"{kind or 'no Content-Type'} is not an event stream")
            raise self._bad_response(response, not_sse)

    def _feed(self, events: EventStream, line: str, response: httpx.Response) -> Progress | Job | None:
        try:
            return events.feed(line)
        except ANSWER_ERRORS as e:
            raise self._bad_response(response, e) from e

    @staticmethod
    def _away(error: DDPMError) -> bool:
        """Whether `error` says the server is away for now (restarting: refusing, silent, or its proxy
        saying so), so that a stream tries again, rather than an answer to give up on."""
        return error.status == 0 or error.status in GATEWAY_STATUSES

    def _reconnect_delay(self, events: EventStream, error: DDPMError | None) -> float:
        """Seconds to wait before opening the stream of a job that has not ended again; raises once
        `retries` connections in a row delivered nothing (a connection that did resets the count: a proxy
        that caps how long a connection lasts does not end a long job's stream)."""
        if events.heard:
            events.failures = 0
        events.heard = False
        if events.failures >= self.retries:
            if error is None:
                error = DDPMError(
                    0, "stream_ended", f"the stream of job {events.job_id} kept closing before the job ended"
                )
            error.attempts = events.failures + 1
            raise error
        delay = self._delay(events.failures) or 0.0
        events.failures += 1
        return delay

    # Operations, each written once

    @staticmethod
    def _create(path: str, body: dict[str, Any], wait: bool) -> Flow[Job]:
        response = yield Call("POST", path, json=body, params={"wait": "true"} if wait else None, wait=wait)
        return Job.from_api(response.json())

    @staticmethod
    def _get_job(method: str, job: Job | str) -> Flow[Job]:
        response = yield Call(method, f"/jobs/{id_of(job)}")
        return Job.from_api(response.json())

    @staticmethod
    def _models() -> Flow[list[Model]]:
        response = yield Call("GET", "/models")
        fields = Model.__dataclass_fields__  # those a server older than a field lacks take its default
        return [Model(**{k: entry[k] for k in fields if k in entry}) for entry in response.json()]

    @staticmethod
    def _images(job: Job | str, as_: Literal["array", "pil"]) -> Flow[np.ndarray | list[Image.Image]]:
        job_id = id_of(job)
        if as_ == "array":
            response = yield Call("GET", f"/jobs/{job_id}/images.npy")
            return np.load(io.BytesIO(response.content), allow_pickle=False)
        if not isinstance(job, Job) or job.result is None:
            job = Job.from_api((yield Call("GET", f"/jobs/{job_id}")).json())
        if job.status != "succeeded":  # as the server answers `images` and `grid` of such a job
            state = "has not finished" if not job.done else f"ended as {job.status}"
            raise DDPMError(409, "not_finished", f"job {job_id} {state}; results exist once it has succeeded")
        if not job.image_count:  # a likelihood job: numbers, no images; the server says so (404 no_images)
            yield Call("GET", f"/jobs/{job_id}/images/0.png")
        images = []
        for k in range(job.image_count):
            response = yield Call("GET", f"/jobs/{job_id}/images/{k}.png")
            images.append(Image.open(io.BytesIO(response.content)))
        return images

    @staticmethod
    def _grid(job: Job | str) -> Flow[Image.Image]:
        response = yield Call("GET", f"/jobs/{id_of(job)}/grid.png")
        return Image.open(io.BytesIO(response.content))
