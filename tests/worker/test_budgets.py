"""Distributed mode's budgets on a real redis-server: a worker stores a job's previews within its byte
budget (DDPM_MAX_PREVIEW_BYTES), and the SUBMIT script holds each API key to its share of the queue
(DDPM_MAX_QUEUED_JOBS_PER_KEY), counted from the queues themselves so it follows jobs that leave them."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest
import redis

from app.api.dispatch import OwnerQueueFull, QueueFull
from app.api.redis_dispatch import RedisDispatcher
from app.engine.work import Work
from app.jobs import JobRecord
from app.jobs import redis_lua as lua
from app.jobs.encoding import preview_pngs
from app.jobs.previews import BUDGET_PARAM
from app.jobs.redis_keys import GROUP
from app.jobs.redis_store import RedisJobStore
from app.jobs.redis_writer import JobWriter
from app.jobs.registry import ModelSpec
from app.worker.listener import RedisListener
from tests.jobs.test_preview_budget import STEPS, check_within, noise
from tests.tiny import tiny_checkpoint
from tests.worker.test_worker import KEYS, settings

pytestmark = pytest.mark.anyio

ALICE, BOB = "a" * 64, "b" * 64  # owner ids (hashes of API keys)
API_KEYS = ["k" * 16 + "-alice", "k" * 16 + "-bobby"]


def test_a_worker_stores_previews_within_the_jobs_budget(r: redis.Redis):
    budget = 6 * sum(len(text) for text in preview_pngs(noise(4, 1)))
    job = JobRecord(id="wb1", kind="sample", model="tiny", params={"n": 4})
    r.register_script(lua.CREATE)(keys=KEYS.job_keys(job.id), args=[60_000, *lua.record_pairs(job)])
    ended: list[tuple[str, bool]] = []
    listener = RedisListener(JobWriter(r, 60), on_end=lambda job_id, ack: ended.append((job_id, ack)))
    params = {"n": 4, "stream_every": 1, BUDGET_PARAM: budget}
    listener.watch(Work(job_id=job.id, kind="sample", model="tiny", params=params))
    listener.on_started(job.id, STEPS)
    for step in range(1, STEPS + 1):
        listener.on_progress(job.id, step, STEPS, STEPS - step, noise(4, step), noise(4, -step))
    listener.on_finished(job.id, noise(4, 0), {})
    listener.close(time.monotonic() + 10)
    assert ended == [(job.id, True)]
    events = r.xrange(KEYS.events(job.id))
    previews = [json.loads(f[b"data"]) for _, f in events if f[b"type"] == b"progress"]
    check_within(previews, budget)


@pytest.fixture
async def keyed(redis_server, r) -> AsyncIterator[RedisDispatcher]:
    """The API's side with API keys on, one job per key in the queue at most; no worker runs anything."""
    r.hset(KEYS.models, "tiny", ModelSpec.of(tiny_checkpoint(timesteps=50)).to_json())
    store = RedisJobStore.from_url(redis_server.url, 60)
    overrides = dict(api_keys=API_KEYS, max_queued_jobs=4, max_queued_jobs_per_key=2)
    dispatcher = await RedisDispatcher.open(settings(redis_server, **overrides), store)
    yield dispatcher
    await dispatcher.close()
    await store.close()


async def submit(dispatcher: RedisDispatcher, owner: str | None) -> JobRecord:
    job = JobRecord(id=f"job{time.monotonic_ns()}", kind="sample", model="tiny", params={}, owner=owner)
    await dispatcher.submit(job, Work(job.id, "sample", "tiny", {"n": 1, "steps": 5, "seed": 1}))
    return job


async def test_one_key_cannot_fill_the_queue_and_its_jobs_stop_counting_once_they_leave_it(keyed, r):
    first = await submit(keyed, ALICE)
    second = await submit(keyed, ALICE)
    with pytest.raises(OwnerQueueFull) as refused:
        await submit(keyed, ALICE)
    assert refused.value.limit == 2
    await submit(keyed, BOB)  # another key still has room
    await keyed.cancel(first)  # cancelled while queued: no longer waiting
    third = await submit(keyed, ALICE)
    with pytest.raises(OwnerQueueFull):
        await submit(keyed, ALICE)
    r.xreadgroup(GROUP, "w", {KEYS.queue("tiny"): ">"}, count=1)  # a worker takes `second` (the oldest)
    await submit(keyed, ALICE)  # alice: `third` and this one waiting
    late = await submit(keyed, BOB)  # 4 waiting in all: the queue as a whole is full
    with pytest.raises(QueueFull) as full:
        await submit(keyed, BOB)
    assert not isinstance(full.value, OwnerQueueFull)
    r.xdel(KEYS.queue("tiny"), r.hget(KEYS.job(late.id), "_entry"))  # room in the queue again
    with pytest.raises(OwnerQueueFull):
        await submit(keyed, ALICE)
    r.delete(KEYS.job(third.id))  # a record gone (as if expired): its entry counts for no one
    await submit(keyed, ALICE)
    assert second.id != third.id


async def test_without_api_keys_the_per_key_limit_does_not_apply(redis_server, r):
    r.hset(KEYS.models, "tiny", ModelSpec.of(tiny_checkpoint(timesteps=50)).to_json())
    store = RedisJobStore.from_url(redis_server.url, 60)
    overrides = dict(max_queued_jobs=3, max_queued_jobs_per_key=1)
    dispatcher = await RedisDispatcher.open(settings(redis_server, **overrides), store)
    try:
        for _ in range(3):
            await submit(dispatcher, None)
        with pytest.raises(QueueFull) as refused:
            await submit(dispatcher, None)
        assert not isinstance(refused.value, OwnerQueueFull)
    finally:
        await dispatcher.close()
        await store.close()
