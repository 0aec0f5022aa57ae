"""Server-Sent Events plumbing: wire format, a per-key connection limit, the shutdown signal that ends
open streams, and a response that always releases its slot when the connection ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app import metrics

HEARTBEAT = b": heartbeat\n\n"
SHUTDOWN_EVENT = "shutdown"
SHUTDOWN_DATA = {
    "code": "server_shutdown",
    "message": "this server is shutting down; reconnect with Last-Event-ID to resume where you were",
}


def format_event(event_id: int, event: str, data: Any) -> bytes:
    """One SSE message; JSON data has no raw newlines, so one `data:` line always suffices."""
    payload = json.dumps(data, separators=(",", ":"), default=str)
    return f"id: {event_id}\nevent: {event}\ndata: {payload}\n\n".encode()


def shutdown_message() -> bytes:
    """The last message of a stream that ends because this server is stopping, not because the job ended.

    It has no `id:`, so a client's Last-Event-ID stays that of the last event it received: reconnecting
    with it (to another replica, or to this service once it is back) resumes without a gap or a repeat.
    Clients that do not know the event type ignore it, and see the stream close before `done`/`error`,
    which they already treat as a dropped connection to resume.
    """
    payload = json.dumps(SHUTDOWN_DATA, separators=(",", ":"))
    return f"event: {SHUTDOWN_EVENT}\ndata: {payload}\n\n".encode()


class Draining:
    """Set once, when the server starts shutting down (before it waits for open connections to finish):
    every open `/stream` then ends at once with a `shutdown` event, instead of holding the shutdown until
    its job ends or the server's graceful timeout cuts it. Event-loop only: no lock."""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None
        self._set = False

    @property
    def is_set(self) -> bool:
        return self._set

    def future(self) -> asyncio.Future[None]:
        """Done once draining started; shared by every stream of this process (created on first use)."""
        if self._future is None or self._future.get_loop() is not asyncio.get_running_loop():
            self._future = asyncio.get_running_loop().create_future()
            if self._set:
                self._future.set_result(None)
        return self._future

    def set(self) -> None:
        self._set = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)


class StreamLimiter:
    """Counts open streams per caller (("key", API key) or ("address", host)); lives on the event loop,
    so no lock is needed."""

    def __init__(self, per_key: int):
        self.per_key = per_key
        self._open: Counter[tuple[str, str]] = Counter()

    def acquire(self, key: tuple[str, str]) -> bool:
        if self._open[key] >= self.per_key:
            return False
        self._open[key] += 1
        metrics.SSE_STREAMS.inc()
        return True

    def release(self, key: tuple[str, str]) -> None:
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]
        metrics.SSE_STREAMS.dec()


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` that watches for the client going away and then runs `on_close` exactly once.

    Starlette only listens for disconnects on older ASGI spec versions; here it always does, so a
    client that leaves frees its stream slot at once, not at the next heartbeat.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncGenerator[bytes, None], *, on_close: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            try:
                await self.body_iterator.aclose()  # type: ignore[union-attr]
            finally:
                self._on_close()
