"""ASGI middleware: request-body size limit, request-latency metrics and the headers every response has.

Pure ASGI (not `BaseHTTPMiddleware`) so that streaming responses (SSE) pass straight through and a
body is never read twice.
"""

from __future__ import annotations

import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.api.errors import ApiError, error_response

_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
# On every response (JSON, PNG/NPY downloads, SSE, errors, the page): no browser guesses a type other than
# the one declared, e.g. renders an uploaded-then-served body as HTML.
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"),)


def with_security_headers(message: Message) -> Message:
    """`message` with SECURITY_HEADERS added when it starts a response (each unless already there)."""
    if message["type"] != "http.response.start":
        return message
    headers = list(message.get("headers", ()))
    present = {name.lower() for name, _ in headers}
    headers.extend((name, value) for name, value in SECURITY_HEADERS if name not in present)
    return {**message, "headers": headers}


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413: by Content-Length up front, else by counting chunks.

    A body that passes is read here in full (it is at most `max_bytes`) and replayed to the app, so
    a chunked upload cannot stream past the limit into a route.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):  # "²".isdigit() too
                await self._refuse(scope, receive, send, 400, "bad_request", "Content-Length is not a number")
                return
            if len(declared) > 18 or int(declared) > self.max_bytes:  # int() refuses 4300+ digits
                await self._too_large(scope, receive, send)
                return
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if scope["method"] in _NO_BODY_METHODS and not chunked and not int(declared or 0):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: http.disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body is larger than {self.max_bytes} bytes (DDPM_MAX_BODY_BYTES)"
        await self._refuse(scope, receive, send, 413, "body_too_large", message)

    @staticmethod
    async def _refuse(
        scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str
    ) -> None:
        response = error_response(ApiError(status, code, message, headers={"Connection": "close"}))
        await response(scope, receive, send)


class RequestMetricsMiddleware:
    """Observes every request's latency by route template (bounded label set), method and status. Being
    the outermost middleware, it also adds SECURITY_HEADERS to every response, the 413s included.

    Every label is bounded whatever clients send, as this runs before authentication: a method outside
    `metrics.HTTP_METHODS` counts as "other". A request that ends with no answer sent and no error (its
    client went away, e.g. mid-upload) counts as 499, nginx's "client closed request", not as a 500.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, failed = time.perf_counter(), None, False

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(with_security_headers(message))

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            failed = True
            raise
        finally:
            if status is None:
                status = 500 if failed else metrics.CLIENT_CLOSED_REQUEST
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in metrics.HTTP_METHODS else "other"
            metrics.HTTP_REQUEST_SECONDS.labels(route=route, method=method, status=str(status)).observe(
                time.perf_counter() - start
            )
