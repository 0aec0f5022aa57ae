"""What a job store holds: the job record, its status machine and its events.

Plain dataclasses with a JSON round trip (`to_dict`/`from_dict`), so the in-process store and the
Redis store (a later issue) hold exactly the same thing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})

# A job only moves forward: queued → running → one terminal status (or straight to failed/cancelled).
_NEXT: dict[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.RUNNING, Status.FAILED, Status.CANCELLED}),
    Status.RUNNING: TERMINAL,
}


def can_transition(current: Status, new: Status) -> bool:
    """Whether a job in `current` may be set to `new` (staying put is allowed, for progress updates)."""
    return new == current or new in _NEXT.get(current, frozenset())


class EventType(StrEnum):
    PROGRESS = "progress"  # an x̂₀ preview
    DONE = "done"  # the job ended (succeeded or cancelled); its data is the final job
    ERROR = "error"  # the job failed; its data is {"code", "message"}

    @property
    def final(self) -> bool:
        return self is not EventType.PROGRESS


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class JobRecord:
    """One job as stored; the API renders it (adding URLs and the queue position) for clients."""

    id: str
    kind: str
    model: str
    params: dict[str, Any]
    seed: int | None = None
    owner: str | None = None  # a hash of the API key that made it; None with authentication off
    status: Status = Status.QUEUED
    created_at: datetime = field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    step: int = 0
    steps: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["status"] = str(self.status)
        for name in ("created_at", "started_at", "finished_at"):
            value = getattr(self, name)
            data[name] = value.isoformat() if value is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        values = dict(data)
        values["status"] = Status(values["status"])
        for name in ("created_at", "started_at", "finished_at"):
            if values.get(name) is not None:
                values[name] = datetime.fromisoformat(values[name])
        return cls(**values)


RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(JobRecord))


@dataclass(frozen=True)
class Event:
    """One entry of a job's event log; `id` counts from 1 per job, with no gaps."""

    id: int
    type: EventType
    data: dict[str, Any]
