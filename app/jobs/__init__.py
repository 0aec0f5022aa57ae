"""Jobs: records, events and results behind one store interface, and the engine listener that fills it."""

from __future__ import annotations

from app.jobs.memory import MemoryJobStore
from app.jobs.records import Event, EventType, JobRecord, Status
from app.jobs.store import InvalidTransition, JobEnded, JobNotFound, JobStore
from app.settings import Settings


def make_store(settings: Settings) -> JobStore:
    """The store the settings ask for: Redis with DDPM_REDIS_URL (distributed mode), else in-process."""
    if settings.redis_url:
        from app.jobs.redis_store import RedisJobStore

        return RedisJobStore.from_url(settings.redis_url, settings.job_ttl_seconds)
    return MemoryJobStore(ttl_seconds=settings.job_ttl_seconds)


__all__ = [
    "Event",
    "EventType",
    "InvalidTransition",
    "JobEnded",
    "JobNotFound",
    "JobRecord",
    "JobStore",
    "MemoryJobStore",
    "Status",
    "make_store",
]
