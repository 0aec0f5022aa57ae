"""Distributed mode's side of the API: jobs into Redis Streams, models and readiness from worker heartbeats.

The process holds no job state: a job is created and queued by one Lua script (SUBMIT, which also
refuses when the queues are full, or hold the job's API key's share), its record, events and results
live in Redis (RedisJobStore), and any replica can serve any job. What the API knows of the models comes
from the `ModelSpec`s workers publish. A background task refreshes that, the live workers and the queue
positions (and from them `ddpm_queue_waiting`, so the queue depth is known with no worker up) every
`REFRESH_SECONDS`; a position may thus lag by that much, except that a job this replica cancels stops
counting at once. While Redis is away every call raises a redis-py ConnectionError (the model list too,
from the failed refresh on), which `install_error_handler` turns into a 503 that says so. An outage is
logged once when a refresh first fails (WARNING) and once when one succeeds again (INFO); the 503s at
most once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import redis.asyncio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import metrics
from app.api.dispatch import CancelOutcome, ModelEntry, OwnerQueueFull, QueueFull, queued_jobs_per_owner
from app.api.errors import ApiError, error_response
from app.engine.work import Work
from app.jobs import JobRecord, Status
from app.jobs import redis_lua as lua
from app.jobs.records import utcnow
from app.jobs.redis_connect import safe_url
from app.jobs.redis_keys import GROUP
from app.jobs.redis_store import RedisJobStore
from app.jobs.registry import ModelSpec, WorkerInfo, live_workers, model_specs
from app.jobs.work_codec import entry_fields, input_blobs
from app.settings import Settings

log = logging.getLogger(__name__)

REFRESH_SECONDS = 0.5
PING_TIMEOUT_SECONDS = 2.0
RETRY_AFTER_SECONDS = 5
LOG_503_EVERY_SECONDS = 60.0  # at most one log line per this long about the 503s Redis causes


class RedisDispatcher:
    """`Dispatcher` over Redis: XADD to the model's stream, workers do the rest."""

    def __init__(self, settings: Settings, store: RedisJobStore):
        self.settings = settings
        self.store = store
        self.redis: redis.asyncio.Redis = store.redis
        self.keys = store.keys
        self._submit = self.redis.register_script(lua.SUBMIT)
        self._cancel = self.redis.register_script(lua.CANCEL)
        self._waiting = self.redis.register_script(lua.WAITING)
        self._specs: dict[str, ModelSpec] = {}
        self._workers: list[WorkerInfo] = []
        self._unreachable: str | None = None  # why the latest refresh could not read Redis; None if it could
        self._outage = False  # Redis failed a refresh and none has succeeded since (logged once each way)
        self._gauged: set[str] = set()  # the models whose ddpm_queue_waiting this replica exports
        self._positions: dict[str, tuple[str, int]] = {}  # queued job id -> (model, 1-based place)
        self._left: set[str] = set()  # jobs this replica took out of a queue since the last refresh began
        self._refreshing = asyncio.Lock()  # one refresh at a time: an older snapshot never replaces a newer
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
        """The published models; while the latest refresh could not read Redis, a ConnectionError saying
        why (a 503 in every route) rather than what was published before, or nothing."""
        if self._unreachable is not None:
            raise RedisConnectionError(self._unreachable)
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

    async def unready(self, *, workers: bool = True) -> str | None:
        try:
            async with asyncio.timeout(PING_TIMEOUT_SECONDS):
                await self.refresh()
        except TimeoutError:
            self._unreachable = f"no answer within {PING_TIMEOUT_SECONDS:g} s"
            self._outage_began(self._unreachable)
        except RedisError:
            pass  # refresh() noted why
        if self._unreachable is not None:
            return unreachable(self.settings.redis_url or "", self._unreachable)
        if workers and not self._workers:
            return "no worker has a live heartbeat: start ddpm-worker (see docs/distributed.md)"
        return None

    async def refresh(self) -> None:
        """Read the live workers, the published models and the queue positions; note whether Redis
        answered (what `models()` and /readyz report)."""
        async with self._refreshing:
            try:
                workers = await live_workers(self.redis, self.keys)
                specs = await model_specs(self.redis, self.keys)
                positions = await self._queue_positions(specs)
            except RedisError as e:
                self._unreachable = redis_reason(e)
                self._outage_began(self._unreachable)
                raise
            self._workers, self._specs, self._unreachable = workers, specs, None
            if self._outage:
                self._outage = False
                log.info("Redis at %s answers again", safe_url(self.settings.redis_url or ""))
            waiting = dict.fromkeys(specs, 0)
            for model, _ in positions.values():
                waiting[model] += 1
            for model, count in waiting.items():
                metrics.QUEUE_WAITING.labels(model=model).set(count)
            for model in self._gauged - waiting.keys():  # no longer published: its series goes, not stays
                with contextlib.suppress(KeyError):
                    metrics.QUEUE_WAITING.remove(model)
            self._gauged = set(waiting)
            # A job taken out while this snapshot was read may still be in it: leave it out. The next
            # snapshot begins after this one ended, when every job in `_left` has left its queue in Redis.
            self._positions = {job: place for job, place in positions.items() if job not in self._left}
            self._left.clear()

    def _outage_began(self, reason: str) -> None:
        """Log the first failed refresh of an outage (not every one: they come every REFRESH_SECONDS);
        the first refresh that succeeds after it logs the recovery."""
        if not self._outage:
            self._outage = True
            log.warning(
                "%s: requests that need it get 503 until it answers again",
                unreachable(self.settings.redis_url or "", reason),
            )

    async def _refresh_forever(self) -> None:
        while not self._closing:  # a flag, not only cancellation: redis-py can swallow a cancel mid-command
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await self.refresh()
            except RedisError as e:
                log.debug("refresh failed: %s", e)  # logged once per outage by refresh()

    async def _queue_positions(self, specs: dict[str, ModelSpec]) -> dict[str, tuple[str, int]]:
        """Job id -> (model, 1-based place among the jobs still waiting for a worker in its queue)."""
        positions: dict[str, tuple[str, int]] = {}
        args = [GROUP, self.settings.max_queued_jobs, *self.keys.job_affixes()]
        for model in specs:
            waiting = await self._waiting(keys=[self.keys.queue(model)], args=args)
            for i, job in enumerate(waiting):
                positions[job.decode()] = (model, i + 1)
        return positions

    def _left_queue(self, job: JobRecord) -> None:
        """A queued job this replica took out of its queue stops counting here at once (elsewhere at the
        next refresh): the jobs behind it move up."""
        self._left.add(job.id)
        gone = self._positions.pop(job.id, None)
        if gone is not None:
            self._positions = {
                other: (model, place - 1 if model == gone[0] and place > gone[1] else place)
                for other, (model, place) in self._positions.items()
            }

    # ---- jobs ----------------------------------------------------------------------------------
    async def submit(self, job: JobRecord, work: Work) -> None:
        queues = [self.keys.queue(job.model)] + [self.keys.queue(m) for m in self._specs if m != job.model]
        fields = lua.record_pairs(job)
        blobs: list[str | bytes] = []
        for name, data in input_blobs(work).items():
            blobs += [name, data]
        entry = [value for pair in entry_fields(work).items() for value in pair]
        per_owner = queued_jobs_per_owner(self.settings, job.owner)
        args = [
            lua.ttl_ms(self.store.ttl_seconds),
            self.settings.max_queued_jobs,
            GROUP,
            "" if per_owner is None else per_owner,
            lua.to_json(job.owner),
            *self.keys.job_affixes(),
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
        if outcome == "owner_full" and per_owner is not None:
            raise OwnerQueueFull(per_owner)
        if outcome != "ok":
            raise ValueError(f"job {job.id} already exists")
        self._positions[job.id] = (job.model, int(reply[1]))

    async def cancel(self, job: JobRecord) -> CancelOutcome:
        keys = [*self.keys.job_keys(job.id), self.keys.queue(job.model)]
        args = [lua.ttl_ms(self.store.ttl_seconds), lua.to_json(utcnow())]
        outcome = (await self._cancel(keys=keys, args=args)).decode()
        if outcome == "cancelled":  # it was queued: ended here and now, its entry gone (no worker counts it)
            self._left_queue(job)
            metrics.JOBS.labels(kind=job.kind, outcome=str(Status.CANCELLED)).inc()
        return CancelOutcome.NO_RUNNER if outcome == "missing" else CancelOutcome.REQUESTED

    def queue_position(self, job: JobRecord) -> int | None:
        known = self._positions.get(job.id)
        return known[1] if known is not None else None

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=4 * REFRESH_SECONDS)


def redis_reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


def unreachable(url: str, reason: str) -> str:
    """What /readyz and every 503 `redis_unavailable` say about the job store: its URL (no password), why."""
    return f"Redis is unreachable at {safe_url(url)} ({reason})"


_last_503_log = -math.inf  # time.monotonic() of the latest log line about a 503


async def _redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    global _last_503_log
    if isinstance(exc, OutOfMemoryError):  # maxmemory-policy noeviction: writes refused, nothing dropped
        code, message = "redis_full", "the job store (Redis) is out of memory; retry when jobs have expired"
    else:
        code = "redis_unavailable"
        url = request.app.state.settings.redis_url or ""
        message = f"{unreachable(url, redis_reason(exc))}; retry in a few seconds"
    now = time.monotonic()
    if now - _last_503_log >= LOG_503_EVERY_SECONDS:  # not one line per request during an outage
        _last_503_log = now
        log.warning(
            "answering 503 %s (%s %s): %s; logged at most every %g s",
            code,
            request.method,
            request.url.path,
            message,
            LOG_503_EVERY_SECONDS,
        )
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return error_response(ApiError(503, code, message, headers=headers))


def install_error_handler(app: FastAPI) -> None:
    """Redis being away (down, unreachable, a replica during failover) or full becomes a 503 saying so in
    any route, not a 500."""
    for error in (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError):
        app.add_exception_handler(error, _redis_unavailable)
