"""Where the API sends its jobs: one small interface, two implementations.

- `LocalDispatcher` (embedded mode): the models are loaded in this process and run by an `EnginePool`
  whose listener, the `JobRunner`, records progress in the store.
- `RedisDispatcher` (distributed mode, app/api/redis_dispatch.py): jobs go to a Redis Stream per model
  and `ddpm-worker` processes run them; this process loads no model.

`JobService` speaks only to this interface and the `JobStore`, so every route works the same in both.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from app.engine.work import Work
from app.jobs import JobRecord, JobStore
from app.jobs.runner import JobRunner
from app.settings import Settings

if TYPE_CHECKING:
    from app.engine.pool import EnginePool
    from app.jobs.registry import ModelSpec
    from app.nets import Checkpoint

log = logging.getLogger(__name__)

ENGINE_STOP_SECONDS = 10.0


@dataclass(frozen=True)
class ModelEntry:
    """A model requests can name: its checkpoint (embedded) or the spec its workers published (distributed).
    Both give `resolution`, `channels`, `scheduler`, `num_parameters` and `source`."""

    name: str
    ckpt: Checkpoint | ModelSpec
    default: bool

    @property
    def timesteps(self) -> int:
        return int(self.ckpt.scheduler.num_train_timesteps)


class QueueFull(Exception):
    """Too many jobs are waiting (max_queued_jobs)."""


class OwnerQueueFull(QueueFull):
    """The job's owner (an API key) has `limit` jobs waiting already (max_queued_jobs_per_key)."""

    def __init__(self, limit: int):
        super().__init__(limit)
        self.limit = limit


def queued_jobs_per_owner(settings: Settings, owner: str | None) -> int | None:
    """The most jobs `owner` may have waiting: `max_queued_jobs_per_key`, or a quarter of
    `max_queued_jobs` (at least 1) when unset; None (no such limit) without API keys, where every client
    is the one anonymous owner and only `max_queued_jobs` applies."""
    if owner is None or not settings.auth_enabled:
        return None
    if settings.max_queued_jobs_per_key is not None:
        return settings.max_queued_jobs_per_key
    return max(1, settings.max_queued_jobs // 4)


class Unavailable(Exception):
    """Nothing can run the job now (the message says why)."""


class CancelOutcome(Enum):
    REQUESTED = "requested"  # whoever runs (or queues) the job will end it
    NOT_FOUND = "not_found"  # the runner does not know it (yet, or any more): look again shortly
    NO_RUNNER = "no_runner"  # nothing can end it: the API ends it itself


class Dispatcher(Protocol):
    def models(self) -> dict[str, ModelEntry]:
        """The models requests may name."""

    def default_model(self) -> str | None: ...

    async def unready(self, *, workers: bool = True) -> str | None:
        """Why the service cannot serve now (for /readyz), or None when it can. `workers=False`: whether
        this replica can, whatever the workers (distributed: Redis answers)."""

    async def submit(self, job: JobRecord, work: Work) -> None:
        """Record the queued `job` and hand its `work` on; QueueFull or Unavailable when it cannot."""

    async def cancel(self, job: JobRecord) -> CancelOutcome:
        """Ask whoever holds the job to end it as cancelled."""

    def queue_position(self, job: JobRecord) -> int | None:
        """1-based place of a queued job in its model's queue, when known."""

    async def close(self) -> None: ...


class LocalDispatcher:
    """Embedded mode: engines in this process."""

    def __init__(self, settings: Settings, store: JobStore, pool: EnginePool, runner: JobRunner):
        self.settings = settings
        self.store = store
        self.pool = pool
        self.runner = runner
        self._models = {
            name: ModelEntry(name, engine.ckpt, name == pool.default) for name, engine in pool.engines.items()
        }
        # Owner -> {job id: model} of the jobs it submitted that may still wait; which do is read from
        # the engines' queues at each of its submissions (so nothing drifts), and the rest forgotten.
        self._owned: dict[str, dict[str, str]] = {}

    @classmethod
    async def open(
        cls, settings: Settings, store: JobStore, checkpoints: dict[str, Checkpoint] | None
    ) -> LocalDispatcher:
        """Load the models (off the event loop, unless given) and start one engine thread per model."""
        from app.engine.pool import EnginePool
        from app.loading import load_models

        loaded = checkpoints if checkpoints is not None else await asyncio.to_thread(load_models, settings)
        runner = JobRunner(store, asyncio.get_running_loop())
        pool = EnginePool(
            loaded,
            listener=runner,
            max_batch=settings.max_batch,
            policy=settings.engine_policy,
            fast=settings.fast_path(),
        )
        runner.stop_job = pool.cancel
        pool.start()
        return cls(settings, store, pool, runner)

    def models(self) -> dict[str, ModelEntry]:
        return self._models

    def default_model(self) -> str | None:
        return self.pool.default

    async def unready(self, *, workers: bool = True) -> str | None:
        dead = [name for name, engine in self.pool.engines.items() if not engine.alive]
        if dead:
            return f"engine not running for model(s): {', '.join(dead)}"
        limit = self.settings.engine_stall_seconds
        if hung := self.pool.stalled(limit):
            setting = "DDPM_ENGINE_STALL_SECONDS"
            return f"engine of {', '.join(hung)} in one step for over {limit:g} s ({setting}): hung?"
        return None

    def queued(self) -> int:
        return sum(engine.queued for engine in self.pool.engines.values())

    async def submit(self, job: JobRecord, work: Work) -> None:
        if not self.pool.engines[job.model].alive:
            raise Unavailable(f"the {job.model} engine is not running; see /readyz")
        if self.queued() >= self.settings.max_queued_jobs:
            raise QueueFull
        limit = queued_jobs_per_owner(self.settings, job.owner)
        if limit is not None and self.waiting_of(job.owner) >= limit:  # None without an owner
            raise OwnerQueueFull(limit)
        await self.store.create(job)
        self.runner.watch(work)
        try:
            self.pool.submit(work)
        except Exception as e:
            log.exception("job %s: the engine refused it", job.id)
            self.runner.forget(job.id)
            raise Unavailable(f"the {job.model} engine is not running; see /readyz") from e
        if limit is not None:
            self._owned.setdefault(job.owner, {})[job.id] = job.model

    def waiting_of(self, owner: str) -> int:
        """How many of `owner`'s jobs wait in an engine's queue (the jobs that have left one forgotten)."""
        owned = self._owned.get(owner, {})
        for job_id, model in list(owned.items()):
            engine = self.pool.engines.get(model)
            if engine is None or engine.queue_position(job_id) is None:
                del owned[job_id]
        if not owned:
            self._owned.pop(owner, None)
        return len(owned)

    async def cancel(self, job: JobRecord) -> CancelOutcome:
        engine = self.pool.engines.get(job.model)
        if engine is None or not engine.alive:
            return CancelOutcome.NO_RUNNER
        accepted = await asyncio.to_thread(self.pool.cancel, job.id, job.model)
        if accepted or self.runner.ending(job.id):  # ended already: its end is on its way, wait for it
            return CancelOutcome.REQUESTED
        return CancelOutcome.NOT_FOUND

    def queue_position(self, job: JobRecord) -> int | None:
        engine = self.pool.engines.get(job.model)
        position = engine.queue_position(job.id) if engine is not None else None
        return None if position is None else position + 1

    async def close(self) -> None:
        """Stop the engines, then flush what they reported."""
        await asyncio.to_thread(self.pool.stop, ENGINE_STOP_SECONDS)
        await asyncio.to_thread(self.runner.close)
        await self.runner.drain()
