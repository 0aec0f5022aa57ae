"""The in-process job store of embedded mode: dictionaries on the event loop, nothing shared across threads.

All methods must be called from the event loop that runs the app (the job runner hops onto it with
`call_soon_threadsafe`), so no locks are needed. Records are copied in and out, so callers see the
same value semantics as with a network-backed store.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from app.jobs.records import RECORD_FIELDS, Event, EventType, JobRecord, Status, can_transition
from app.jobs.store import InvalidTransition, JobEnded, JobNotFound

_SWEEP_INTERVAL_SECONDS = 1.0


@dataclass
class _Entry:
    record: JobRecord
    expires_at: float
    events: list[Event] = field(default_factory=list)
    results: dict[str, bytes] = field(default_factory=dict)
    # Replaced on every change; followers wait on the one current when they ran out of events.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


def _ended(entry: _Entry) -> bool:
    """Whether the job's final event is recorded."""
    return bool(entry.events) and entry.events[-1].type.final


class MemoryJobStore:
    """`JobStore` in this process's memory; a job is kept while it has not ended, then expires
    `ttl_seconds` after its last change."""

    def __init__(self, ttl_seconds: float, *, clock: Callable[[], float] = time.monotonic):
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._jobs: dict[str, _Entry] = {}
        self._next_sweep = 0.0

    def _live(self, job_id: str) -> _Entry | None:
        self._sweep()  # every access (at most once a second) drops the expired jobs, blobs and events
        entry = self._jobs.get(job_id)
        if entry is not None and entry.expires_at <= self._clock():
            self._drop(job_id)
            return None
        return entry

    def _drop(self, job_id: str) -> None:
        entry = self._jobs.pop(job_id, None)
        if entry is not None:
            entry.notify()  # followers re-check, find the job gone, and stop

    def _sweep(self) -> None:
        now = self._clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_INTERVAL_SECONDS
        for job_id in [j for j, e in self._jobs.items() if e.expires_at <= now]:
            self._drop(job_id)

    def _touch(self, entry: _Entry) -> None:
        # A job waiting in the queue (or running) is never dropped, however long it waits: its client
        # could no longer find it while the engine still ran it.
        ended = entry.record.status.terminal
        entry.expires_at = self._clock() + self.ttl_seconds if ended else math.inf
        entry.notify()

    def _entry(self, job_id: str) -> _Entry:
        entry = self._live(job_id)
        if entry is None:
            raise JobNotFound(job_id)
        return entry

    async def create(self, job: JobRecord) -> None:
        if self._live(job.id) is not None:
            raise ValueError(f"job {job.id} already exists")
        entry = self._jobs[job.id] = _Entry(copy.deepcopy(job), math.inf)
        self._touch(entry)

    async def get(self, job_id: str, *, owner: str | None) -> JobRecord | None:
        entry = self._live(job_id)
        if entry is None or entry.record.owner != owner:
            return None
        return copy.deepcopy(entry.record)

    async def update(self, job_id: str, **changes: Any) -> JobRecord:
        entry = self._entry(job_id)
        unknown = set(changes) - RECORD_FIELDS
        if unknown or "id" in changes:
            raise ValueError(f"cannot update job fields {sorted(unknown | ({'id'} & set(changes)))}")
        if "status" in changes:
            new = Status(changes["status"])
            if not can_transition(entry.record.status, new):
                raise InvalidTransition(job_id, entry.record.status, new)
            changes["status"] = new
        elif _ended(entry):
            raise JobEnded(job_id)
        entry.record = dataclasses.replace(entry.record, **copy.deepcopy(changes))
        self._touch(entry)
        return copy.deepcopy(entry.record)

    async def append_event(self, job_id: str, type: EventType, data: dict[str, Any]) -> Event:
        entry = self._entry(job_id)
        if _ended(entry):
            raise JobEnded(job_id)
        event = Event(id=len(entry.events) + 1, type=EventType(type), data=data)
        entry.events.append(event)
        self._touch(entry)
        return event

    async def event_count(self, job_id: str) -> int:
        return len(self._entry(job_id).events)

    async def events(self, job_id: str, after_id: int = 0) -> AsyncIterator[Event]:
        entry = self._entry(job_id)
        position = max(after_id, 0)  # ids are 1, 2, …: the event with id after_id + 1 is at this index
        while True:
            while position < len(entry.events):
                event = entry.events[position]
                position += 1
                yield event
                if event.type.final:
                    return
            if self._live(job_id) is not entry or (entry.events and entry.events[-1].type.final):
                return  # expired, or resumed after the final event
            # Wake on the next change, or when the job would expire, to end the iteration then.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.changed.wait(), max(entry.expires_at - self._clock(), 0.0))

    async def put_result(self, job_id: str, name: str, data: bytes) -> None:
        entry = self._entry(job_id)
        entry.results[name] = bytes(data)
        self._touch(entry)

    async def get_result(self, job_id: str, name: str) -> bytes | None:
        entry = self._live(job_id)
        return None if entry is None else entry.results.get(name)

    async def close(self) -> None:
        for job_id in list(self._jobs):
            self._drop(job_id)
