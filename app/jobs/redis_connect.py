"""Redis clients with the timeouts distributed mode relies on: fail fast while Redis is away, so the API
answers 503 within a second or two and every loop backs off and retries instead of hanging."""

from __future__ import annotations

from urllib.parse import urlsplit

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

CONNECT_TIMEOUT_SECONDS = 2.0
# Above the longest blocking read (XREAD/XREADGROUP BLOCK ≤ 1 s), so a block never reads as a timeout.
SOCKET_TIMEOUT_SECONDS = 5.0
# One quick retry covers a dropped idle connection; more would only delay the 503 of a Redis that is down.
_RETRIES = 1
_BACKOFF = dict(cap=0.2, base=0.05)


def async_client(url: str) -> redis.asyncio.Redis:
    """The API's client (bytes in and out: results are binary)."""
    return redis.asyncio.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        retry=AsyncRetry(ExponentialBackoff(**_BACKOFF), _RETRIES),
    )


def sync_client(url: str) -> redis.Redis:
    """A worker's client, shared by its threads (redis-py's pool hands each call its own connection)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        retry=Retry(ExponentialBackoff(**_BACKOFF), _RETRIES),
    )


def safe_url(url: str) -> str:
    """`url` as messages may show it: credentials masked, query dropped (it can carry `password=`)."""
    parts = urlsplit(url)
    credentials, at, host = parts.netloc.rpartition("@")
    netloc = f"***@{host}" if at and credentials else host
    return f"{parts.scheme}://{netloc}{parts.path}"
