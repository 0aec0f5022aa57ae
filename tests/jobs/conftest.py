"""Store backends under test: every contract test runs against each (in-process; Redis on a real server)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from app.jobs import JobStore, MemoryJobStore
from tests.redis_server import RedisServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the module's tests (each test's jobs have fresh random ids)."""
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[float], JobStore]]:
    """A factory of fresh stores with a given TTL, closed at the end of the test."""
    stores: list[JobStore] = []

    def make(ttl_seconds: float = 60.0, *, clock: Callable[[], float] | None = None) -> JobStore:
        """`clock`: the memory store's (Redis keeps its own time)."""
        store: JobStore
        if request.param == "memory":
            store = MemoryJobStore(ttl_seconds=ttl_seconds, **({"clock": clock} if clock else {}))
        else:
            from app.jobs.redis_store import RedisJobStore

            server: RedisServer = request.getfixturevalue("redis_server")
            store = RedisJobStore.from_url(server.url, ttl_seconds)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()
