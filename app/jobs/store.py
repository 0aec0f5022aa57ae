"""The one interface between the API and wherever jobs live (this process, or Redis in distributed mode).

Every method is a coroutine (or an async iterator) and every value crossing it is a plain record, event
or `bytes`, so a network-backed store can implement it without leaking queues or locks to callers.

Expiry: a job, its events and its results are kept while the job has not ended (queued however long,
or running), then for `ttl_seconds` after it last changed; after that the job is unknown, exactly like a
wrong id. After its final event (done or error) a job takes no more events nor progress: a worker still
computing a job that was cancelled or ended elsewhere cannot add to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from app.jobs.records import Event, EventType, JobRecord, Status


class JobNotFound(LookupError):
    """No such job: never created, or expired."""


class JobEnded(ValueError):
    """A change to a job after its final event: it has ended, and nothing more is recorded."""

    def __init__(self, job_id: str):
        super().__init__(f"job {job_id} has ended: nothing more is recorded")


class InvalidTransition(ValueError):
    """A status change that would move a job backwards (e.g. out of a terminal status)."""

    def __init__(self, job_id: str, current: Status, new: Status):
        super().__init__(f"job {job_id}: cannot go from {current} to {new}")
        self.current = current
        self.new = new


class JobStore(Protocol):
    """Job records, per-job event logs and per-job result blobs."""

    async def create(self, job: JobRecord) -> None:
        """Store a new job; its id must be unused."""

    async def get(self, job_id: str, *, owner: str | None) -> JobRecord | None:
        """The job if it exists, has not expired and was made by `owner` (None = no auth); else None."""

    async def update(self, job_id: str, **changes: Any) -> JobRecord:
        """Change fields of a job and return it; raises JobNotFound, InvalidTransition (for `status`), or
        JobEnded for a change without `status` after the job's final event."""

    async def append_event(self, job_id: str, type: EventType, data: dict[str, Any]) -> Event:
        """Add an event with the next id (1, 2, …) and wake every follower of the job; JobEnded after the
        job's final event."""

    async def event_count(self, job_id: str) -> int:
        """How many events the job has so far (the id of its last); raises JobNotFound if unknown."""

    def events(self, job_id: str, after_id: int = 0) -> AsyncIterator[Event]:
        """The job's events with id > after_id: the recorded ones, then new ones as they come, ending
        after a final (done/error) event or when the job expires; raises JobNotFound if unknown."""

    async def put_result(self, job_id: str, name: str, data: bytes) -> None:
        """Store one result blob (e.g. "0.png", "images.npy", "grid.png") of a job."""

    async def get_result(self, job_id: str, name: str) -> bytes | None:
        """A result blob, or None if the job or the blob does not exist (yet)."""

    async def close(self) -> None:
        """Release connections and end every follower."""
