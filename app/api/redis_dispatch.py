"""Distributed mode's side of the API: jobs into Redis Streams, models and readiness from worker heartbeats.

The process holds no job state: a job is created and queued by one Lua script (SUBMIT, which also
refuses when the queues are full), its record, events and results live in Redis (RedisJobStore), and
any replica can serve any job. What the API knows of the models comes from the `ModelSpec`s workers
publish. A background task refreshes that, the live workers and the queue positions every
`REFRESH_SECONDS`; a position may thus lag by that much. While Redis is away every call raises a
redis-py ConnectionError, which `install_error_handler` turns into a 503 that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.api.dispatch import CancelOutcome, ModelEntry, QueueFull
from app.api.errors import ApiError, error_response
from app.engine.work import Work
from app.jobs import JobRecord
from app.jobs import redis_lua as lua
from app.jobs.records import utcnow
from app.jobs.redis_keys import GROUP
from app.jobs.redis_store import RedisJobStore
from app.jobs.registry import ModelSpec, WorkerInfo, live_workers, model_specs
from app.jobs.work_codec import entry_fields, input_blobs
from app.settings import Settings

log = logging.getLogger(__name__)

REFRESH_SECONDS = 0.5
PING_TIMEOUT_SECONDS = 2.0
RETRY_AFTER_SECONDS = 5


class RedisDispatcher:
    """`Dispatcher` over Redis: XADD to the model's stream, workers do the rest."""

    def __init__(self, settings: Settings, store: RedisJobStore):
        self.settings = settings
        self.store = store
        self.redis: redis.asyncio.Redis = store.redis
        self.keys = store.keys
        self._submit = self.redis.register_script(lua.SUBMIT)
        self._cancel = self.redis.register_script(lua.CANCEL)
        self._specs: dict[str, ModelSpec] = {}
        self._workers: list[WorkerInfo] = []
        self._positions: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    async def open(cls, settings: Settings, store: RedisJobStore) -> RedisDispatcher:
        """Start refreshing; a Redis that is down at start-up only makes /readyz 503 until it is back."""
        dispatcher = cls(settings, store)
        with contextlib.suppress(RedisError):
            await dispatcher.refresh()
        dispatcher._task = asyncio.create_task(dispatcher._refresh_forever())
        return dispatcher

    # ---- what the workers published ----------------------------------------------------------
    def models(self) -> dict[str, ModelEntry]:
        default = self.default_model()
        return {name: ModelEntry(name, spec, name == default) for name, spec in sorted(self._specs.items())}

    def default_model(self) -> str | None:
        """The first model of the longest-running live worker (each worker lists its default first), or
        the first published model by name when no worker is live."""
        for worker in self._workers:
            for name in worker.models:
                if name in self._specs:
                    return name
        return min(self._specs, default=None)

    async def unready(self) -> str | None:
        try:
            async with asyncio.timeout(PING_TIMEOUT_SECONDS):
                await self.redis.ping()
                await self.refresh()
        except (RedisError, TimeoutError) as e:
            return f"Redis is unreachable ({redis_reason(e)})"
        if not self._workers:
            return "no worker has a live heartbeat: start ddpm-worker (see docs/distributed.md)"
        return None

    async def refresh(self) -> None:
        self._workers = await live_workers(self.redis, self.keys)
        self._specs = await model_specs(self.redis, self.keys)
        self._positions = await self._queue_positions()

    async def _refresh_forever(self) -> None:
        while not self._closing:  # a flag, not only cancellation: redis-py can swallow a cancel mid-command
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await self.refresh()
            except RedisError as e:
                log.debug("refresh failed: %s", e)  # the requests meanwhile get 503s that say why

    async def _queue_positions(self) -> dict[str, int]:
        """Job id -> 1-based position among the entries no worker has claimed yet, per model."""
        positions: dict[str, int] = {}
        for model in self._specs:
            queue = self.keys.queue(model)
            try:
                groups = await self.redis.xinfo_groups(queue)
            except redis.exceptions.ResponseError:
                continue  # no queue yet
            last = [g["last-delivered-id"] for g in groups if g["name"] == GROUP.encode()]
            start = f"({last[0].decode()}" if last else "-"
            entries = await self.redis.xrange(queue, start, "+", count=self.settings.max_queued_jobs)
            for i, (_, fields) in enumerate(entries):
                positions[fields[b"job"].decode()] = i + 1
        return positions

    # ---- jobs ----------------------------------------------------------------------------------
    async def submit(self, job: JobRecord, work: Work) -> None:
        queues = [self.keys.queue(job.model)] + [self.keys.queue(m) for m in self._specs if m != job.model]
        fields = lua.record_pairs(job)
        blobs: list[str | bytes] = []
        for name, data in input_blobs(work).items():
            blobs += [name, data]
        entry = [value for pair in entry_fields(work).items() for value in pair]
        args = [
            lua.ttl_ms(self.store.ttl_seconds),
            self.settings.max_queued_jobs,
            GROUP,
            len(fields) // 2,
            *fields,
            len(blobs) // 2,
            *blobs,
            *entry,
        ]
        reply = await self._submit(keys=[*self.keys.job_keys(job.id), *queues], args=args)
        outcome = reply[0].decode()
        if outcome == "full":
            raise QueueFull
        if outcome != "ok":
            raise ValueError(f"job {job.id} already exists")
        self._positions[job.id] = int(reply[1])

    async def cancel(self, job: JobRecord) -> CancelOutcome:
        keys = [*self.keys.job_keys(job.id), self.keys.queue(job.model)]
        args = [lua.ttl_ms(self.store.ttl_seconds), lua.to_json(utcnow())]
        outcome = (await self._cancel(keys=keys, args=args)).decode()
        return CancelOutcome.NO_RUNNER if outcome == "missing" else CancelOutcome.REQUESTED

    def queue_position(self, job: JobRecord) -> int | None:
        return self._positions.get(job.id)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=4 * REFRESH_SECONDS)


def redis_reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


async def _redis_unavailable(_: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, OutOfMemoryError):  # maxmemory-policy noeviction: writes refused, nothing dropped
        code, message = "redis_full", "the job store (Redis) is out of memory; retry when jobs have expired"
    else:
        code = "redis_unavailable"
        message = f"the job store (Redis) is unreachable ({redis_reason(exc)}); retry in a few seconds"
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return error_response(ApiError(503, code, message, headers=headers))


def install_error_handler(app: FastAPI) -> None:
    """Redis being away (down, unreachable, a replica during failover) or full becomes a 503 saying so in
    any route, not a 500."""
    for error in (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError):
        app.add_exception_handler(error, _redis_unavailable)
