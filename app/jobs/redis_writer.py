"""A worker's side of the job store: the same records, events and Lua scripts as `RedisJobStore`, written
with the sync client from the worker's writer threads (no event loop in a worker)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import redis

from app.jobs import redis_lua as lua
from app.jobs.records import TERMINAL, EventType, JobRecord, Status
from app.jobs.redis_keys import Keys

ENDED = "ok"  # what `end` returns when this call ended the job


class JobWriter:
    """Job changes from a worker; every method is one round trip and safe to call from any thread."""

    def __init__(self, client: redis.Redis, ttl_seconds: float, *, keys: Keys | None = None):
        self.redis = client
        self.keys = keys or Keys()
        self._ttl = lua.ttl_ms(ttl_seconds)
        self._update = client.register_script(lua.UPDATE)
        self._append = client.register_script(lua.APPEND)
        self._end = client.register_script(lua.END)

    def update(self, job_id: str, **changes: Any) -> JobRecord:
        status, pairs = lua.change_args(changes)
        reply = self._update(keys=self.keys.job_keys(job_id), args=[self._ttl, status, *pairs])
        return lua.updated_record(job_id, status, reply)

    def progress(self, job_id: str, step: int, steps: int, preview: dict[str, Any] | None) -> None:
        """Record progress and, on preview steps, append the preview event (one round trip)."""
        keys = self.keys.job_keys(job_id)
        _, pairs = lua.change_args({"step": step, "steps": steps})
        with self.redis.pipeline(transaction=False) as pipe:
            self._update(keys=keys, args=[self._ttl, "", *pairs], client=pipe)
            if preview is not None:
                args = [self._ttl, EventType.PROGRESS.value, json.dumps(preview)]
                self._append(keys=keys, args=args, client=pipe)
            pipe.execute()

    def end(
        self,
        job_id: str,
        status: Status,
        event: tuple[EventType, dict[str, Any]],
        fields: Mapping[str, Any],
        results: Mapping[str, bytes] | None = None,
    ) -> str:
        """End the job unless it already ended: `ENDED`, "missing", the terminal status it had, or
        "invalid:<status>". Results, fields, status and the final event land together or not at all."""
        _, pairs = lua.change_args(fields)
        blobs: list[str | bytes] = []
        for name, data in (results or {}).items():
            blobs += [name, data]
        event_type, data = event
        args = [self._ttl, str(status), event_type.value, json.dumps(data), len(pairs) // 2, *pairs, *blobs]
        return self._end(keys=self.keys.job_keys(job_id), args=args).decode()

    def status(self, job_id: str) -> Status | None:
        value = self.redis.hget(self.keys.job(job_id), "status")
        return None if value is None else Status(value.decode())

    def status_and_created(self, job_id: str) -> tuple[Status | None, datetime | None]:
        """The job's status and creation time (None, None once it expired), in one round trip."""
        status, created = self.redis.hmget(self.keys.job(job_id), "status", "created_at")
        if status is None:
            return None, None
        when = json.loads(created) if created is not None else None
        return Status(status.decode()), datetime.fromisoformat(when) if when else None

    def inputs(self, job_id: str) -> dict[bytes, bytes]:
        return self.redis.hgetall(self.keys.inputs(job_id))

    def to_stop(self, job_ids: list[str]) -> set[str]:
        """The jobs among `job_ids` their worker should stop: cancelled (marked by the API, or ended by it
        while queued), ended elsewhere, or expired."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self.keys.job(job_id), "status", "_cancel")
            replies = pipe.execute()
        stop = set()
        for job_id, (status, mark) in zip(job_ids, replies, strict=True):
            if status is None or mark is not None or Status(status.decode()) in TERMINAL:
                stop.add(job_id)
        return stop
