"""Who serves what in distributed mode: worker heartbeats and the models they publish.

API replicas load no checkpoints. A worker publishes a `ModelSpec` of each model it loads (everything
requests are validated against and GET /models shows) and keeps a heartbeat key with a TTL; the API
reads both. A worker whose heartbeat key expired is dead for /readyz, and its queue entries are taken
over by the others once idle past the reclaim time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import redis
import redis.asyncio

from app.jobs.redis_keys import Keys
from app.nets.config import SchedulerConfig


@dataclass(frozen=True)
class ModelSpec:
    """A model's metadata without its weights: the attributes of `Checkpoint` the API reads."""

    name: str
    source: str
    resolution: int
    channels: int
    num_parameters: int
    scheduler: SchedulerConfig

    @classmethod
    def of(cls, ckpt) -> ModelSpec:  # an app.nets.Checkpoint (not imported: it would pull in torch here)
        return cls(
            name=ckpt.name,
            source=ckpt.source,
            resolution=ckpt.resolution,
            channels=ckpt.channels,
            num_parameters=ckpt.num_parameters,
            scheduler=ckpt.scheduler,
        )

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k != "scheduler"}
        return json.dumps({**data, "scheduler": self.scheduler.to_dict()})

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelSpec:
        data = json.loads(text)
        return cls(**{**data, "scheduler": SchedulerConfig.from_dict(data["scheduler"])})


@dataclass(frozen=True)
class WorkerInfo:
    """What a heartbeat says: a worker's name, models (its default first), device and capacity."""

    name: str
    models: list[str]
    device: str
    max_batch: int
    pid: int
    host: str
    started_at: float  # unix time

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerInfo:
        return cls(**json.loads(text))


def publish(client: redis.Redis, keys: Keys, info: WorkerInfo, specs: list[ModelSpec], ttl_ms: int) -> None:
    """A worker announces itself and its models (at start; `heartbeat` keeps it alive)."""
    with client.pipeline(transaction=False) as pipe:
        for spec in specs:
            pipe.hset(keys.models, spec.name, spec.to_json())
        pipe.sadd(keys.workers, info.name)
        pipe.set(keys.worker(info.name), info.to_json(), px=ttl_ms)
        pipe.execute()


def heartbeat(client: redis.Redis, keys: Keys, info: WorkerInfo, ttl_ms: int) -> None:
    """Renew the heartbeat key (re-adding the name, in case Redis restarted without persistence)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.sadd(keys.workers, info.name)
        pipe.set(keys.worker(info.name), info.to_json(), px=ttl_ms)
        pipe.execute()


def retire(client: redis.Redis, keys: Keys, name: str) -> None:
    """A worker that exits cleanly leaves at once instead of when its heartbeat expires."""
    with client.pipeline(transaction=False) as pipe:
        pipe.delete(keys.worker(name))
        pipe.srem(keys.workers, name)
        pipe.execute()


async def live_workers(client: redis.asyncio.Redis, keys: Keys) -> list[WorkerInfo]:
    """Workers with a live heartbeat, oldest first; names whose heartbeat is gone are pruned."""
    names = sorted(await client.smembers(keys.workers))
    if not names:
        return []
    values = await client.mget([keys.worker(n.decode()) for n in names])
    dead = [name for name, value in zip(names, values, strict=True) if value is None]
    if dead:
        await client.srem(keys.workers, *dead)
    workers = [WorkerInfo.from_json(value) for value in values if value is not None]
    return sorted(workers, key=lambda w: (w.started_at, w.name))


async def model_specs(client: redis.asyncio.Redis, keys: Keys) -> dict[str, ModelSpec]:
    """Every published model by name (an operator retires one with `HDEL <prefix>:models NAME`)."""
    return {
        name.decode(): ModelSpec.from_json(text) for name, text in (await client.hgetall(keys.models)).items()
    }
