"""GET /stream/{id}: a job's progress as Server-Sent Events (replay, Last-Event-ID resume, heartbeats)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request

from app.api import schemas
from app.api.deps import OwnerDep, ServiceDep, SettingsDep
from app.api.errors import ApiError, invalid
from app.api.service import RETRY_AFTER_SECONDS, JobService
from app.api.sse import (
    HEARTBEAT,
    SHUTDOWN_DATA,
    Draining,
    EventStreamResponse,
    format_event,
    shutdown_message,
)
from app.jobs import Event, EventType

router = APIRouter(tags=["jobs"])


def _event(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """One SSE event as OpenAPI 3.2 (and FastAPI's own SSE routes) describe it: `data` is JSON text."""
    return {
        "type": "object",
        "required": ["id", "event", "data"],
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9]+$", "description": "increasing, from 1"},
            "event": {"const": name},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
        },
    }


_EVENT = {
    "oneOf": [
        _event("progress", schemas.ProgressEvent.model_json_schema()),  # self-contained: no nested models
        _event("done", {"$ref": "#/components/schemas/Job"}),
        _event("error", {"$ref": "#/components/schemas/JobError"}),
        {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"const": "shutdown"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": "#/components/schemas/JobError"},
                    "examples": [json.dumps(SHUTDOWN_DATA, separators=(",", ":"))],
                },
            },
        },
    ]
}
_SSE = {
    200: {
        "content": {
            "text/event-stream": {"schema": {"type": "array", "items": _EVENT}, "itemSchema": _EVENT}
        },
        "description": "events `progress` (data: ProgressEvent), then `done` (data: Job) or `error` "
        "(data: {code, message}); each with an increasing `id`; comment heartbeats in between. When the "
        "server shuts down, open streams end with `shutdown` (no `id`; data: {code: server_shutdown, "
        "message}): reconnect with `Last-Event-ID` (to another replica) to resume",
    }
}
# Errors are JSON, not events: spelled out, since `model` would document them under text/event-stream.
_ERRORS = {
    status: {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for status, description in (
        (401, "missing or wrong API key"),
        (404, "unknown or expired job"),
        (422, "bad Last-Event-ID or query"),
        (429, "too many open streams for this API key (without keys: for this client address)"),
    )
}


def _streams(n: int) -> str:
    return f"{n} stream" if n == 1 else f"{n} streams"


def _address(request: Request) -> tuple[str, str]:
    """The client's address as uvicorn saw it (behind a proxy: from X-Forwarded-For when the proxy is
    trusted, FORWARDED_ALLOW_IPS)."""
    return "address", request.client.host if request.client is not None else "unknown"


def _after_id(last_event_id: str | None) -> int:
    if last_event_id is None or not last_event_id.strip():
        return 0
    value = last_event_id.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 18:  # not "²", nor 4300 digits for int()
        raise invalid("Last-Event-ID", "must be the id of an event of this stream (a non-negative integer)")
    return int(value)


async def _next(events: AsyncIterator[Event]) -> Event:
    return await anext(events)


async def _messages(
    service: JobService,
    job_id: str,
    owner: str | None,
    after: int,
    xt: bool,
    heartbeat: float,
    draining: Draining,
) -> AsyncIterator[bytes]:
    """Replays, then follows, the job's events; a comment every `heartbeat` seconds while idle; a
    `shutdown` event, then the end, once the server starts shutting down."""
    events = service.store.events(job_id, after)
    pending: asyncio.Task[Event] | None = None
    closing = draining.future()
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(_next(events))
            waiting = {pending, closing}
            done, _ = await asyncio.wait(waiting, timeout=heartbeat, return_when=asyncio.FIRST_COMPLETED)
            if pending not in done:
                if closing in done:  # an event that is ready goes out first; the shutdown after it
                    yield shutdown_message()
                    return
                yield HEARTBEAT
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield format_event(event.id, event.type.value, await _data(service, event, job_id, owner, xt))
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        await events.aclose()


async def _data(service: JobService, event: Event, job_id: str, owner: str | None, xt: bool) -> Any:
    if event.type is EventType.DONE:
        # The final job object, rendered now (it is final: the store recorded the end before the event).
        return service.render(await service.get(job_id, owner)).model_dump(mode="json")
    if event.type is EventType.PROGRESS and not xt:
        return {k: v for k, v in event.data.items() if k != "xt"}
    return event.data


@router.get(
    "/stream/{job_id}",
    status_code=200,
    response_class=EventStreamResponse,
    responses={**_SSE, **_ERRORS},
)
async def stream(
    job_id: str,
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    owner: OwnerDep,
    xt: Annotated[bool, Query(description="also send x_t with each preview")] = False,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", description="resume after this event id")
    ] = None,
) -> EventStreamResponse:
    """Progressive x̂₀ previews of a job: replayed from the first event (or after `Last-Event-ID`), then
    live; ends after `done` or `error`. A job that already ended streams its events at once. When this
    server shuts down, the stream ends with a `shutdown` event: reconnect with `Last-Event-ID`."""
    job = await service.get(job_id, owner)
    after = _after_id(last_event_id)
    if after and after > (count := await service.event_count(job_id)):
        # The client saw events the server no longer has (a Redis that restarted without its last
        # writes): go on from the last one it has, and send a job's end again, so the client learns it.
        after = count - 1 if job.status.terminal and count else count
    limiter = request.app.state.streams
    # Per API key; without keys, per client address, so one viewer's tabs cannot shut out the others.
    key, whose = (
        (("key", owner), "this API key") if owner is not None else (_address(request), "this address")
    )
    if not limiter.acquire(key):
        raise ApiError(
            429,
            "too_many_streams",
            f"{whose} has {_streams(settings.max_streams_per_key)} open, the most allowed "
            "(DDPM_MAX_STREAMS_PER_KEY); close one first",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    draining = request.app.state.draining
    messages = _messages(service, job_id, owner, after, xt, settings.heartbeat_seconds, draining)
    return EventStreamResponse(messages, on_close=lambda: limiter.release(key))
