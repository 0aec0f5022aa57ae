"""Jobs: records, events and results behind one store interface, and the engine listener that fills it."""

from __future__ import annotations

from app.jobs.memory import MemoryJobStore
from app.jobs.records import Event, EventType, JobRecord, Status
from app.jobs.store import InvalidTransition, JobNotFound, JobStore
from app.settings import Settings


class DistributedModeUnavailable(RuntimeError):
    """DDPM_REDIS_URL is set, but the Redis backend is not implemented yet."""


def make_store(settings: Settings) -> JobStore:
    """The store the settings ask for: in-process now; Redis Streams when its issue lands."""
    if settings.redis_url:
        raise DistributedModeUnavailable(
            "DDPM_REDIS_URL is set, but distributed mode (Redis) is not implemented yet; "
            "unset it to run embedded (one process, in-process job store)"
        )
    return MemoryJobStore(ttl_seconds=settings.job_ttl_seconds)


__all__ = [
    "DistributedModeUnavailable",
    "Event",
    "EventType",
    "InvalidTransition",
    "JobNotFound",
    "JobRecord",
    "JobStore",
    "MemoryJobStore",
    "Status",
    "make_store",
]
