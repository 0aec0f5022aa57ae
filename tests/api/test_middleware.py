"""The body-limit middleware on headers no HTTP client library would send, straight through ASGI."""

from __future__ import annotations

import asyncio

import pytest

from app.api.middleware import BodyLimitMiddleware


async def _unreachable(scope, receive, send) -> None:
    raise AssertionError("the request reached the app")


def _status(content_length: bytes) -> int:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/sample",
        "headers": [(b"content-length", content_length)],
    }
    asyncio.run(BodyLimitMiddleware(_unreachable, max_bytes=1024)(scope, receive, send))
    return sent[0]["status"]


@pytest.mark.parametrize(
    ("content_length", "status"),
    [
        (b"2048", 413),
        (b"9" * 5000, 413),  # more digits than int() reads
        ("\u00b2".encode("latin-1"), 400),  # "²".isdigit(), but no number
        (b"-1", 400),
    ],
)
def test_a_content_length_is_refused_before_the_body_is_read(content_length, status):
    assert _status(content_length) == status
