"""Store backends under test: every contract test runs against each (Redis joins with its issue)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from app.jobs import JobStore, MemoryJobStore


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[float], JobStore]]:
    """A factory of fresh stores with a given TTL, closed at the end of the test."""
    stores: list[JobStore] = []

    def make(ttl_seconds: float = 60.0) -> JobStore:
        if request.param == "memory":
            store = MemoryJobStore(ttl_seconds=ttl_seconds)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()
