"""The JobStore contract: every backend must pass these (they define what the API may rely on)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from app.jobs import EventType, InvalidTransition, JobEnded, JobNotFound, JobRecord, MemoryJobStore, Status

pytestmark = pytest.mark.anyio


def new_job(owner: str | None = None) -> JobRecord:
    return JobRecord(id=uuid.uuid4().hex, kind="sample", model="tiny", params={"n": 2}, seed=7, owner=owner)


async def collect(store, job_id: str, after_id: int = 0, timeout: float = 2.0) -> list:
    async def run() -> list:
        return [event async for event in store.events(job_id, after_id)]

    return await asyncio.wait_for(run(), timeout)


async def test_created_job_reads_back_and_is_a_copy(make_store):
    store = make_store()
    job = new_job()
    await store.create(job)
    got = await store.get(job.id, owner=None)
    assert got == job
    got.params["n"] = 99
    assert (await store.get(job.id, owner=None)).params == {"n": 2}


async def test_unknown_job_is_none_and_updates_fail(make_store):
    store = make_store()
    assert await store.get("nope", owner=None) is None
    assert await store.get_result("nope", "0.png") is None
    with pytest.raises(JobNotFound):
        await store.update("nope", step=1)
    with pytest.raises(JobNotFound):
        await store.append_event("nope", EventType.PROGRESS, {})
    with pytest.raises(JobNotFound):
        await collect(store, "nope")


async def test_a_job_is_visible_only_to_its_owner(make_store):
    store = make_store()
    mine = new_job(owner="hash-a")
    await store.create(mine)
    assert (await store.get(mine.id, owner="hash-a")).id == mine.id
    assert await store.get(mine.id, owner="hash-b") is None
    assert await store.get(mine.id, owner=None) is None


async def test_status_moves_forward_only(make_store):
    store = make_store()
    job = new_job()
    await store.create(job)
    running = await store.update(job.id, status=Status.RUNNING, steps=10)
    assert (running.status, running.steps) == (Status.RUNNING, 10)
    done = await store.update(job.id, status=Status.SUCCEEDED, result={"image_count": 2})
    assert done.status is Status.SUCCEEDED
    for backwards in (Status.RUNNING, Status.QUEUED, Status.CANCELLED, Status.FAILED):
        with pytest.raises(InvalidTransition):
            await store.update(job.id, status=backwards)
    assert (await store.get(job.id, owner=None)).status is Status.SUCCEEDED


@pytest.mark.parametrize("end", [Status.CANCELLED, Status.FAILED])
async def test_a_queued_job_can_end_without_running(make_store, end):
    store = make_store()
    job = new_job()
    await store.create(job)
    assert (await store.update(job.id, status=end)).status is end


async def test_a_queued_job_cannot_succeed_without_running(make_store):
    store = make_store()
    job = new_job()
    await store.create(job)
    with pytest.raises(InvalidTransition):
        await store.update(job.id, status=Status.SUCCEEDED)


async def test_event_ids_count_from_one_and_replay_in_order(make_store):
    store = make_store()
    job = new_job()
    await store.create(job)
    for step in (1, 2, 3):
        event = await store.append_event(job.id, EventType.PROGRESS, {"step": step})
        assert event.id == step
    await store.append_event(job.id, EventType.DONE, {"status": "succeeded"})
    events = await collect(store, job.id)
    assert [e.id for e in events] == [1, 2, 3, 4]
    assert [e.data.get("step") for e in events[:3]] == [1, 2, 3]
    assert events[-1].type is EventType.DONE


async def test_resume_after_an_id_gives_only_later_events(make_store):
    store = make_store()
    job = new_job()
    await store.create(job)
    for step in range(1, 6):
        await store.append_event(job.id, EventType.PROGRESS, {"step": step})
    await store.append_event(job.id, EventType.ERROR, {"code": "nan", "message": "x"})
    assert [e.id for e in await collect(store, job.id, after_id=3)] == [4, 5, 6]
    assert [e.id for e in await collect(store, job.id, after_id=6)] == []


async def test_followers_get_live_events_and_stop_after_the_final_one(make_store):
    store = make_store()
    job = new_job()
    await store.create(job)
    await store.append_event(job.id, EventType.PROGRESS, {"step": 1})
    early = asyncio.create_task(collect(store, job.id))
    resumed = asyncio.create_task(collect(store, job.id, after_id=1))
    await asyncio.sleep(0.05)
    assert not early.done()  # still following: no final event yet
    await store.append_event(job.id, EventType.PROGRESS, {"step": 2})
    await store.append_event(job.id, EventType.DONE, {"status": "succeeded"})
    assert [e.id for e in await early] == [1, 2, 3]
    assert [e.id for e in await resumed] == [2, 3]


async def test_results_round_trip_per_job_and_name(make_store):
    store = make_store()
    a, b = new_job(), new_job()
    await store.create(a)
    await store.create(b)
    await store.put_result(a.id, "0.png", b"\x89PNG-a")
    await store.put_result(a.id, "grid.png", b"grid")
    assert await store.get_result(a.id, "0.png") == b"\x89PNG-a"
    assert await store.get_result(a.id, "grid.png") == b"grid"
    assert await store.get_result(a.id, "1.png") is None
    assert await store.get_result(b.id, "0.png") is None
    with pytest.raises(JobNotFound):
        await store.put_result("nope", "0.png", b"x")


async def test_jobs_expire_with_their_events_and_results_after_they_end(make_store):
    store = make_store(ttl_seconds=0.3)
    job = new_job()
    await store.create(job)
    await store.append_event(job.id, EventType.PROGRESS, {"step": 1})
    await store.put_result(job.id, "0.png", b"png")
    await store.update(job.id, status=Status.RUNNING)
    await store.update(job.id, status=Status.SUCCEEDED)
    await asyncio.sleep(0.45)
    assert await store.get(job.id, owner=None) is None
    assert await store.get_result(job.id, "0.png") is None
    with pytest.raises(JobNotFound):
        await collect(store, job.id)
    with pytest.raises(JobNotFound):
        await store.update(job.id, status=Status.RUNNING)


class Elapse:
    """Time passing for a store's expiry, without sleeping (a sleep a few tenths of a second short of the
    TTL is a race on a busy machine): the memory store's clock moves on; in Redis, each of the job's keys
    that has a TTL loses that much of it (PEXPIRE to what would be left, deleted at 0), as the clock
    would have taken it, and a key without one (PTTL -1) keeps none."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:  # the memory store's clock
        return self.now

    async def by(self, store, job_id: str, seconds: float) -> None:
        self.now += seconds
        if isinstance(store, MemoryJobStore):
            return
        for key in store.keys.job_keys(job_id):
            left = await store.redis.pttl(key)
            if left < 0:  # -1: kept for good; -2: no such key
                continue
            if left <= seconds * 1000:
                await store.redis.delete(key)
            else:
                await store.redis.pexpire(key, left - round(seconds * 1000))


TTL = 60.0  # long against the test's own run time: only Elapse moves a job towards its expiry


@pytest.mark.parametrize("status", [Status.QUEUED, Status.RUNNING])
async def test_a_job_that_has_not_ended_is_kept_however_long_it_waits(make_store, status):
    """A job waiting behind long ones outlives the TTL: its client must still find it (and its worker
    still record its end) when its turn comes."""
    elapse = Elapse()
    store = make_store(ttl_seconds=TTL, clock=elapse)
    job = new_job()
    await store.create(job)
    await store.put_result(job.id, "input", b"x")
    if status is Status.RUNNING:
        await store.update(job.id, status=status)
    await elapse.by(store, job.id, 10 * TTL)
    assert (await store.get(job.id, owner=None)).status is status
    assert await store.get_result(job.id, "input") == b"x"
    await store.update(job.id, status=Status.CANCELLED)  # the TTL starts at the end
    await elapse.by(store, job.id, 0.9 * TTL)
    assert (await store.get(job.id, owner=None)).status is Status.CANCELLED
    assert await store.get_result(job.id, "input") == b"x"
    await elapse.by(store, job.id, 0.2 * TTL)
    assert await store.get(job.id, owner=None) is None
    assert await store.get_result(job.id, "input") is None


async def test_a_change_postpones_expiry(make_store):
    elapse = Elapse()
    store = make_store(ttl_seconds=TTL, clock=elapse)
    job = new_job()
    await store.create(job)
    await store.update(job.id, status=Status.FAILED)
    await elapse.by(store, job.id, 0.6 * TTL)
    await store.append_event(job.id, EventType.ERROR, {"code": "x", "message": "y"})
    await elapse.by(store, job.id, 0.6 * TTL)  # past the TTL since the end, not since the last change
    assert (await store.get(job.id, owner=None)).status is Status.FAILED
    assert [e.type for e in await collect(store, job.id)] == [EventType.ERROR]
    await elapse.by(store, job.id, 0.5 * TTL)  # and past it since the change too
    assert await store.get(job.id, owner=None) is None


async def test_a_follower_of_a_job_that_expires_stops(make_store):
    store = make_store(ttl_seconds=0.3)
    job = new_job()
    await store.create(job)
    await store.append_event(job.id, EventType.PROGRESS, {"step": 1})
    await store.update(job.id, status=Status.FAILED)  # ended, though no final event came
    events = await collect(store, job.id, timeout=2.0)
    assert [e.id for e in events] == [1]


async def test_event_count_is_the_id_of_the_last_event(make_store):
    store = make_store()
    job = new_job()
    await store.create(job)
    assert await store.event_count(job.id) == 0
    await store.append_event(job.id, EventType.PROGRESS, {"step": 1})
    await store.append_event(job.id, EventType.DONE, {"status": "succeeded"})
    assert await store.event_count(job.id) == 2
    with pytest.raises(JobNotFound):
        await store.event_count("nope")


async def test_after_its_final_event_a_job_takes_no_more_events_nor_progress(make_store):
    """A worker still computing a job cancelled (or ended) elsewhere cannot add to it: a client resuming
    after `done` must never be sent a `progress`."""
    store = make_store()
    job = new_job()
    await store.create(job)
    await store.update(job.id, status=Status.CANCELLED)
    await store.append_event(job.id, EventType.DONE, {"status": "cancelled"})
    with pytest.raises(JobEnded):
        await store.append_event(job.id, EventType.PROGRESS, {"step": 1})
    with pytest.raises(JobEnded):
        await store.update(job.id, step=1, steps=50)
    with pytest.raises(JobEnded):
        await store.append_event(job.id, EventType.DONE, {"status": "cancelled"})  # nor a second end
    assert [e.id for e in await collect(store, job.id)] == [1]
    assert (await store.get(job.id, owner=None)).step == 0
