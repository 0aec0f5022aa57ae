"""MemoryJobStore's own rules (the contract both stores keep is in test_store_contract.py)."""

import pytest

from app.jobs import JobRecord, Status
from app.jobs.memory import MemoryJobStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_expired_jobs_leave_memory_at_any_access_not_only_at_the_next_job():
    now = [0.0]
    store = MemoryJobStore(ttl_seconds=10, clock=lambda: now[0])
    for job_id in ("old1", "old2"):
        await store.create(JobRecord(id=job_id, kind="sample", model="tiny", params={}))
        await store.put_result(job_id, "0.png", b"x" * 1000)
        await store.update(job_id, status=Status.CANCELLED)
    now[0] = 11.0
    assert await store.get("another", owner=None) is None  # a read of something else, no new job
    assert store._jobs == {}
