"""The Redis backend of `JobStore` (distributed mode): every API replica sees the same jobs, events, results.

Layout (app/jobs/redis_keys.py): a hash per job, a stream of its events whose entry `0-n` is event n (so
replay and Last-Event-ID resume are one XRANGE from any replica, and followers block on XREAD), and a
hash of its result blobs. Every change runs as one Lua script (app/jobs/redis_lua.py) that checks the
job exists, applies the change and re-arms the expiry of all of the job's keys: none while the job has
not ended, then together `ttl_seconds` after its last change, exactly like the in-process store.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio
from redis.exceptions import RedisError

from app.jobs import redis_lua as lua
from app.jobs.records import Event, EventType, JobRecord
from app.jobs.redis_connect import async_client
from app.jobs.redis_keys import Keys
from app.jobs.store import JobEnded, JobNotFound

_BATCH = 100  # events per XRANGE/XREAD round trip
_MAX_BLOCK_MS = 1000  # a follower re-checks expiry and shutdown at least this often


def stream_id(event_id: int) -> str:
    return f"0-{event_id}"


def event_from_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
    return Event(
        id=int(entry_id.split(b"-")[1]),
        type=EventType(fields[b"type"].decode()),
        data=json.loads(fields[b"data"]),
    )


class RedisJobStore:
    """`JobStore` in Redis; a job is kept while it has not ended, then expires `ttl_seconds` after its
    last change."""

    def __init__(self, client: redis.asyncio.Redis, ttl_seconds: float, *, keys: Keys | None = None):
        self.redis = client
        self.ttl_seconds = ttl_seconds
        self.keys = keys or Keys()
        self._ttl = lua.ttl_ms(ttl_seconds)
        self._create = client.register_script(lua.CREATE)
        self._update = client.register_script(lua.UPDATE)
        self._append = client.register_script(lua.APPEND)
        self._put_result = client.register_script(lua.PUT_RESULT)
        self._closed = False

    @classmethod
    def from_url(cls, url: str, ttl_seconds: float, *, keys: Keys | None = None) -> RedisJobStore:
        return cls(async_client(url), ttl_seconds, keys=keys)

    async def create(self, job: JobRecord) -> None:
        args = [self._ttl, *lua.record_pairs(job)]
        created = await self._create(keys=self.keys.job_keys(job.id), args=args)
        if not created:
            raise ValueError(f"job {job.id} already exists")

    async def get(self, job_id: str, *, owner: str | None) -> JobRecord | None:
        flat = await self.redis.hgetall(self.keys.job(job_id))
        if not flat:
            return None
        job = lua.record_from_hash(flat)
        return job if job.owner == owner else None

    async def update(self, job_id: str, **changes: Any) -> JobRecord:
        status, pairs = lua.change_args(changes)
        reply = await self._update(keys=self.keys.job_keys(job_id), args=[self._ttl, status, *pairs])
        return lua.updated_record(job_id, status, reply)

    async def append_event(self, job_id: str, type: EventType, data: dict[str, Any]) -> Event:
        kind = EventType(type)
        event_id = await self._append(
            keys=self.keys.job_keys(job_id), args=[self._ttl, kind.value, json.dumps(data)]
        )
        if event_id == -1:
            raise JobEnded(job_id)
        if not event_id:
            raise JobNotFound(job_id)
        return Event(id=int(event_id), type=kind, data=data)

    async def event_count(self, job_id: str) -> int:
        exists, count = await self.redis.hmget(self.keys.job(job_id), "status", "_events")
        if exists is None:
            raise JobNotFound(job_id)
        return int(count or 0)

    async def events(self, job_id: str, after_id: int = 0) -> AsyncIterator[Event]:
        job_key, events_key = self.keys.job(job_id), self.keys.events(job_id)
        position = max(after_id, 0)
        known = False
        try:
            while True:
                batch = await self.redis.xrange(events_key, f"({stream_id(position)}", "+", count=_BATCH)
                if not batch:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        pipe.hmget(job_key, "_final", "_events")
                        pipe.pttl(job_key)
                        (final, count), ttl = await pipe.execute()
                    if ttl == -2:  # gone (expired, or never existed); -1: not ended, kept
                        if not known:
                            raise JobNotFound(job_id)
                        return
                    known = True
                    if (final and int(count or 0) <= position) or self._closed:
                        return  # past the final event (a resume after it), or shutting down
                    # Wake when an event comes, the job expires, or a second passes (BLOCK 0 = forever).
                    block = _MAX_BLOCK_MS if ttl < 0 else max(1, min(ttl, _MAX_BLOCK_MS))
                    reply = await self.redis.xread(
                        {events_key: stream_id(position)}, count=_BATCH, block=block
                    )
                    batch = reply[0][1] if reply else []
                known = True
                for entry_id, fields in batch:
                    event = event_from_entry(entry_id, fields)
                    position = event.id
                    yield event
                    if event.type.final:
                        return
        except RedisError:
            if self._closed:
                return
            raise

    async def put_result(self, job_id: str, name: str, data: bytes) -> None:
        stored = await self._put_result(keys=self.keys.job_keys(job_id), args=[self._ttl, name, bytes(data)])
        if not stored:
            raise JobNotFound(job_id)

    async def get_result(self, job_id: str, name: str) -> bytes | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.job(job_id))
            pipe.hget(self.keys.results(job_id), name)
            exists, data = await pipe.execute()
        return data if exists else None

    async def close(self) -> None:
        """Followers end at their next wake-up (≤ 1 s); the connections close now."""
        self._closed = True
        await self.redis.aclose()
