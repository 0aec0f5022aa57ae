"""Worker rules, in-process: completion once, cancellation within a step, skipping, dead letters, 429s."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis
import torch

from app import metrics
from app.api.dispatch import QueueFull
from app.api.redis_dispatch import RedisDispatcher
from app.engine.work import Work
from app.jobs import EventType, JobRecord, Status
from app.jobs.redis_connect import sync_client
from app.jobs.redis_keys import GROUP, Keys
from app.jobs.redis_store import RedisJobStore
from app.jobs.redis_writer import ENDED, JobWriter
from app.jobs.registry import ModelSpec
from app.settings import Settings
from app.worker import Worker
from app.worker.listener import RedisListener
from app.worker.worker import Claim
from tests.redis_server import RedisServer, free_port
from tests.tiny import tiny_checkpoint

pytestmark = pytest.mark.anyio

KEYS = Keys()


def settings(server: RedisServer, **overrides) -> Settings:
    values = dict(
        redis_url=server.url,
        device="cpu",
        max_batch=8,
        worker_heartbeat_seconds=0.1,
        reclaim_idle_seconds=0.4,
        max_queued_jobs=3,
    )
    return Settings(**{**values, **overrides})


@pytest.fixture
async def dispatcher(redis_server, r) -> AsyncIterator[RedisDispatcher]:
    r.hset(KEYS.models, "tiny", ModelSpec.of(tiny_checkpoint(timesteps=50)).to_json())  # as a worker would
    store = RedisJobStore.from_url(redis_server.url, 60)
    dispatcher = await RedisDispatcher.open(settings(redis_server), store)
    yield dispatcher
    await dispatcher.close()
    await store.close()


async def submit(dispatcher: RedisDispatcher, *, n: int = 1, steps: int = 50) -> JobRecord:
    job = JobRecord(id=f"job{time.monotonic_ns()}", kind="sample", model="tiny", params={"n": n}, steps=steps)
    params = dict(n=n, steps=steps, sampler="ddpm", eta=0.0, variance="beta", clip_denoised=True, seed=1)
    await dispatcher.submit(job, Work(job.id, "sample", "tiny", {**params, "stream_every": 1}))
    return job


def status(r: redis.Redis, job_id: str) -> str:
    return r.hget(KEYS.job(job_id), "status").decode()


def final_events(r: redis.Redis, job_id: str) -> list[bytes]:
    return [f[b"type"] for _, f in r.xrange(KEYS.events(job_id)) if f[b"type"] != b"progress"]


async def test_two_workers_ending_one_job_store_one_result_and_make_one_transition(
    dispatcher, r, redis_server
):
    job = await submit(dispatcher)
    first, second = (JobWriter(sync_client(redis_server.url), 60) for _ in range(2))
    first.update(job.id, status=Status.RUNNING)
    done = (EventType.DONE, {"status": "succeeded"})
    assert (
        first.end(job.id, Status.SUCCEEDED, done, {"result": {"image_count": 1}}, {"0.png": b"first"})
        == ENDED
    )
    assert (
        second.end(job.id, Status.SUCCEEDED, done, {"result": {"image_count": 1}}, {"0.png": b"late"})
        == "succeeded"
    )
    error = (EventType.ERROR, {"code": "x", "message": "y"})
    assert second.end(job.id, Status.FAILED, error, {}) == "succeeded"
    assert r.hget(KEYS.results(job.id), "0.png") == b"first"
    assert final_events(r, job.id) == [b"done"]
    assert not r.exists(KEYS.inputs(job.id))  # inputs go once the job has ended


async def test_a_running_job_is_cancelled_within_a_step_and_a_cancelled_queued_one_never_starts(
    dispatcher, r, redis_server
):
    worker = Worker(settings(redis_server), {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w")
    engine = worker.pool.engines["tiny"]
    submitted: list[str] = []
    submit_to_engine = worker.pool.submit

    def submit_spy(work: Work) -> None:
        submitted.append(work.job_id)
        submit_to_engine(work)

    worker.pool.submit = submit_spy
    # How many steps run between the cancel and its end is the poll interval over the step time, which
    # depends on the machine: once the cancel was asked, the engine takes no step past the one under way
    # until the worker has passed the cancel on (pool.cancel). Then at most one more step may run.
    asked, passed_on = threading.Event(), threading.Event()
    cancel_in_engine = worker.pool.cancel

    def cancel(job_id: str, model: str) -> bool:
        known = cancel_in_engine(job_id, model)
        passed_on.set()
        return known

    worker.pool.cancel = cancel

    class Gated:
        def __init__(self, forward):
            self.forward = forward

        def __getattr__(self, name):
            return getattr(self.forward, name)

        def __call__(self, x, t):
            if asked.is_set():
                passed_on.wait(20)  # no more: the job would then run on until its end, and that fails
            return self.forward(x, t)

    engine.forward = Gated(engine.forward)
    duplicates = metrics.DUPLICATE_ENDS.labels(model="tiny")
    duplicates_before = duplicates._value.get()
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        running = await submit(dispatcher, n=8, steps=50)  # fills the worker's 8 rows
        queued = await submit(dispatcher, n=1)
        deadline = time.monotonic() + 20
        while status(r, running.id) != "running":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await dispatcher.cancel(queued)
        deadline = time.monotonic() + 30  # a hang guard, not a speed limit: the gate bounds the steps
        asked.set()
        step_when_asked = engine.forwards  # one forward per step of its only job
        await dispatcher.cancel(running)
        while status(r, running.id) != "cancelled":
            assert time.monotonic() < deadline, status(r, running.id)
            await asyncio.sleep(0.01)
        assert passed_on.is_set()
        # the step under way when the cancel was asked, and the one the gate held
        assert int(r.hget(KEYS.job(running.id), "step")) <= step_when_asked + 2 < 50
        # The worker has free rows again: had the queued job's entry still been there, it would take it.
        while r.xlen(KEYS.queue("tiny")) or r.xpending(KEYS.queue("tiny"), GROUP)["pending"]:
            assert time.monotonic() < deadline, "the queue was not emptied"
            await asyncio.sleep(0.01)
        while worker.free_rows() != 8:
            assert time.monotonic() < deadline, "the cancelled job's rows were not freed"
            await asyncio.sleep(0.01)
        assert submitted == [running.id]  # the cancelled queued job never reached the engine
        assert duplicates._value.get() == duplicates_before  # nor was it run, then refused, here
        assert status(r, queued.id) == "cancelled" and r.hget(KEYS.job(queued.id), "started_at") == b"null"
        assert final_events(r, running.id) == [b"done"] and final_events(r, queued.id) == [b"done"]
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()


async def test_a_job_whose_images_cannot_be_encoded_fails_and_frees_its_rows(
    dispatcher, r, redis_server, monkeypatch
):
    import app.worker.listener as listener

    def broken(images, **kwargs):
        raise MemoryError("out of memory encoding a PNG")

    monkeypatch.setattr(listener, "result_blobs", broken)
    worker = Worker(settings(redis_server), {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w")
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        job = await submit(dispatcher, n=8, steps=5)  # all of the worker's 8 rows
        deadline = time.monotonic() + 20
        while status(r, job.id) != "failed":
            assert time.monotonic() < deadline, status(r, job.id)  # it stayed running, claimed, for ever
            await asyncio.sleep(0.01)
        error = json.loads(r.hget(KEYS.job(job.id), "error"))
        assert error == {
            "code": "encoding_failed",
            "message": "could not encode the job's images (MemoryError); the server log has the details",
        }
        assert final_events(r, job.id) == [b"error"]
        while r.xpending(KEYS.queue("tiny"), GROUP)["pending"] or worker.free_rows() != 8:
            assert time.monotonic() < deadline, "the entry was not acknowledged or the rows not freed"
            await asyncio.sleep(0.01)
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()


async def test_a_preview_that_cannot_be_encoded_fails_the_job_stops_it_and_nothing_follows(
    dispatcher, r, redis_server, monkeypatch
):
    """As in embedded mode (tests/jobs/test_runner.py): not a job that runs on without its previews."""
    import app.worker.listener as listener

    encode, calls = listener.preview_pngs, []

    def broken(x):
        calls.append(1)
        if len(calls) > 4:  # the x̂₀ and x_t of steps 1 and 2 encode; step 3's x̂₀ does not
            raise MemoryError("out of memory encoding a PNG")
        return encode(x)

    monkeypatch.setattr(listener, "preview_pngs", broken)
    worker = Worker(settings(redis_server), {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w")
    stopped, cancel = [], worker.listener.stop_job
    worker.listener.stop_job = lambda job_id, model: stopped.append((job_id, model)) or cancel(job_id, model)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        job = await submit(dispatcher, n=8, steps=50)  # all of the worker's 8 rows, a preview every step
        deadline = time.monotonic() + 20
        while status(r, job.id) != "failed":
            assert time.monotonic() < deadline, status(r, job.id)
            await asyncio.sleep(0.01)
        error = json.loads(r.hget(KEYS.job(job.id), "error"))
        assert error == {
            "code": "encoding_failed",
            "message": "could not encode the job's images (MemoryError); the server log has the details",
        }
        while r.xpending(KEYS.queue("tiny"), GROUP)["pending"] or worker.free_rows() != 8:
            assert time.monotonic() < deadline, "the entry was not acknowledged or the rows not freed"
            await asyncio.sleep(0.01)
        assert stopped == [(job.id, "tiny")]  # the engine was asked to stop it
        while worker.pool.engines["tiny"].running:
            assert time.monotonic() < deadline, "the engine did not stop the job"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        events = [f[b"type"] for _, f in r.xrange(KEYS.events(job.id))]
        assert events == [b"progress", b"progress", b"error"]  # nothing after the error
        assert int(r.hget(KEYS.job(job.id), "step")) == 2
        assert len(worker.listener._broken) == 0
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()


async def _running_job(dispatcher, redis_server, monkeypatch):
    """A queued job that a RedisListener, driven by the test as an engine would drive it, has started.
    Its previews fail once the returned event is set (the writer thread waits for it, so the engine's
    next call comes first)."""
    import app.worker.listener as listener

    job = await submit(dispatcher, steps=5)
    fails = threading.Event()

    def broken(x):
        assert fails.wait(10)
        raise MemoryError("out of memory encoding a PNG")

    monkeypatch.setattr(listener, "preview_pngs", broken)
    ends, stops = [], []
    writer = JobWriter(sync_client(redis_server.url), 60)
    rl = listener.RedisListener(writer, on_end=lambda job_id, ack: ends.append((job_id, ack)))
    rl.stop_job = lambda job_id, model: stops.append(job_id)
    rl.watch(Work(job.id, "sample", "tiny", {"n": 1, "steps": 5}))
    rl.on_started(job.id, 5)
    return job, rl, fails, ends, stops


async def test_a_last_preview_that_fails_after_the_engine_ended_the_job_still_fails_it_and_counts(
    dispatcher, r, redis_server, monkeypatch
):
    job, rl, fails, ends, stops = await _running_job(dispatcher, redis_server, monkeypatch)
    failed = metrics.JOBS.labels(kind="sample", outcome="failed")
    before = failed._value.get()
    x = torch.zeros(1, 1, 8, 8)
    rl.on_progress(job.id, 5, 5, 0, x, x)  # the last step's preview, then at once the job's end
    rl.on_finished(job.id, x, {})
    fails.set()
    rl.close(time.monotonic() + 10)
    assert status(r, job.id) == "failed" and final_events(r, job.id) == [b"error"]  # not then succeeded
    assert json.loads(r.hget(KEYS.job(job.id), "error"))["code"] == "encoding_failed"
    assert failed._value.get() == before + 1  # counted, though the engine had forgotten the job
    assert ends == [(job.id, True)] and stops == []  # nothing left to stop
    assert len(rl._broken) == 0


async def test_a_preview_that_fails_for_a_job_handed_back_leaves_it_to_its_next_owner(
    dispatcher, r, redis_server, monkeypatch
):
    job, rl, fails, ends, stops = await _running_job(dispatcher, redis_server, monkeypatch)
    x = torch.zeros(1, 1, 8, 8)
    rl.on_progress(job.id, 1, 5, 4, x, x)
    rl.drop(job.id)  # handed back (SIGTERM) or taken over; the worker then cancels it in its engine
    rl.on_cancelled(job.id)
    fails.set()
    rl.close(time.monotonic() + 10)
    assert status(r, job.id) == "running" and final_events(r, job.id) == []  # its end is not recorded here
    assert ends == [(job.id, False)] and stops == []  # not acknowledged: the next owner runs it
    assert len(rl._broken) == 0


async def test_a_worker_that_lost_its_claim_to_a_takeover_stops_the_job_and_records_nothing(
    dispatcher, r, redis_server, monkeypatch
):
    """It stalled past the reclaim time and another worker took the entry over: at its next heartbeat it
    stops its copy of the job, whose engine end (a cancellation) is then neither recorded (the job is
    the new owner's) nor acknowledged (the entry is the new owner's). Without this, the job would end
    here as `cancelled` or run on to a duplicate end."""
    job = await submit(dispatcher)
    worker = Worker(settings(redis_server), {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w")
    submitted: list[str] = []
    cancelled: list[tuple[str, str]] = []
    monkeypatch.setattr(worker.pool, "submit", lambda work: submitted.append(work.job_id))
    monkeypatch.setattr(worker.pool, "cancel", lambda job_id, model: cancelled.append((job_id, model)))
    [delivery] = worker.queue.read(count=1, block_ms=100)
    worker._start_all([delivery])
    assert submitted == [job.id] and worker.free_rows() == 7
    worker.listener.on_started(job.id, 50)  # its engine started it; then the worker stalled
    queue = KEYS.queue("tiny")
    r.xclaim(queue, GROUP, "other", 0, [delivery.entry_id])  # taken over while it stalled
    worker._keep_claims()  # its next heartbeat

    assert cancelled == [(job.id, "tiny")]  # its engine is told to stop the job
    assert worker._entries() == {}  # no longer renewed: the claim is the other worker's
    duplicates = metrics.DUPLICATE_ENDS.labels(model="tiny")
    ended_before = {
        outcome: metrics.JOBS.labels(kind="sample", outcome=outcome)._value.get()
        for outcome in ("succeeded", "failed", "cancelled")
    }
    duplicates_before = duplicates._value.get()
    worker.listener.on_cancelled(job.id)  # the engine's answer to that cancel
    worker.listener.close(time.monotonic() + 10)  # every write it posted is done

    assert status(r, job.id) == "running" and final_events(r, job.id) == []  # nothing recorded
    assert r.hget(KEYS.job(job.id), "finished_at") == b"null"
    ended_after = {
        outcome: metrics.JOBS.labels(kind="sample", outcome=outcome)._value.get() for outcome in ended_before
    }
    assert ended_after == ended_before and duplicates._value.get() == duplicates_before
    owners = [(p["message_id"].decode(), p["consumer"]) for p in r.xpending_range(queue, GROUP, "-", "+", 10)]
    assert owners == [(delivery.entry_id, b"other")] and r.xlen(queue) == 1  # not acknowledged here
    assert worker._claims == {} and worker.free_rows() == 8  # its rows are free for other jobs


async def test_a_job_whose_workers_keep_dying_fails_into_the_dead_letter_stream(dispatcher, r, redis_server):
    job = await submit(dispatcher)
    queue = KEYS.queue("tiny")
    r.xreadgroup(GROUP, "ghost", {queue: ">"}, count=1)  # a worker that takes the job and dies
    worker = Worker(
        settings(redis_server, max_deliveries=1), {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w"
    )
    dead_before = metrics.DEAD_LETTERS.labels(model="tiny")._value.get()
    time.sleep(0.45)  # past the reclaim time
    worker._start_all(worker.queue.take_over(8))

    assert status(r, job.id) == "failed"
    error = r.hget(KEYS.job(job.id), "error").decode()
    assert "worker_lost" in error and "dead-letter" in error and "max_deliveries = 1" in error
    [(_, letter)] = r.xrange(KEYS.dead_letter("tiny"))
    assert letter[b"job"].decode() == job.id and letter[b"deliveries"] == b"2"
    assert r.xlen(queue) == 0 and r.xpending(queue, GROUP)["pending"] == 0
    assert metrics.DEAD_LETTERS.labels(model="tiny")._value.get() == dead_before + 1


async def queue_work(dispatcher: RedisDispatcher, kind: str, params: dict, inputs: dict) -> JobRecord:
    job = JobRecord(id=f"job{time.monotonic_ns()}", kind=kind, model="tiny", params=params, steps=50)
    await dispatcher.submit(job, Work(job.id, kind, "tiny", {**params, "stream_every": 0}, inputs))
    return job


def assert_failed_as_invalid(r: redis.Redis, job_id: str, reason: str) -> None:
    """Failed, with `invalid_job` naming `reason`; its entry acknowledged, nothing dead-lettered."""
    assert status(r, job_id) == "failed" and final_events(r, job_id) == [b"error"]
    error = json.loads(r.hget(KEYS.job(job_id), "error"))
    assert error["code"] == "invalid_job", error
    assert error["message"].startswith("the queued job could not be read: ") and reason in error["message"]
    queue = KEYS.queue("tiny")
    assert r.xlen(queue) == 0 and r.xpending(queue, GROUP)["pending"] == 0
    assert r.xlen(KEYS.dead_letter("tiny")) == 0


async def test_a_queue_entry_whose_params_cannot_be_decoded_fails_its_job_as_invalid(
    dispatcher, r, redis_server, monkeypatch
):
    job = await submit(dispatcher)
    worker = Worker(settings(redis_server), {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w")
    submitted: list[str] = []
    monkeypatch.setattr(worker.pool, "submit", lambda work: submitted.append(work.job_id))
    [delivery] = worker.queue.read(count=1, block_ms=100)
    garbled = dataclasses.replace(delivery, fields={**delivery.fields, b"params": b'{"n": 1, "steps'})
    worker._start_all([garbled])
    assert_failed_as_invalid(r, job.id, "Unterminated string")
    assert submitted == [] and worker._claims == {} and worker.free_rows() == 8


@pytest.mark.parametrize(
    ("kind", "params", "name"),
    [
        ("likelihood", {"seed": 1, "curve": False}, "images"),
        (
            "sample",
            {
                "n": 1,
                "steps": 5,
                "sampler": "ddim",
                "eta": 0.0,
                "variance": "beta",
                "clip_denoised": False,
                "seed": 1,
            },
            "latents",
        ),
    ],
)
async def test_a_queued_job_whose_inputs_are_gone_fails_as_invalid_rather_than_running_without_them(
    dispatcher, r, redis_server, monkeypatch, kind, params, name
):
    """The inputs hash lost while the job waited (deleted by hand, or Redis restarted without it): a
    likelihood has no images to score, and a sample would start from noise its seed drew instead of
    the latents its client sent."""
    array = np.zeros((1, 1, 8, 8), np.float32)
    job = await queue_work(dispatcher, kind, params, {name: array})
    r.delete(KEYS.inputs(job.id))
    worker = Worker(settings(redis_server), {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w")
    submitted: list[str] = []
    monkeypatch.setattr(worker.pool, "submit", lambda work: submitted.append(work.job_id))
    worker._start_all(worker.queue.read(count=1, block_ms=100))
    assert_failed_as_invalid(r, job.id, repr(name))
    assert submitted == [] and worker._claims == {}
    kept = await queue_work(dispatcher, kind, params, {name: array + 0.5})  # its inputs still there
    worker._start_all(worker.queue.read(count=1, block_ms=100))
    assert submitted == [kept.id] and status(r, kept.id) == "queued"
    np.testing.assert_array_equal(worker._claims[kept.id].work.inputs[name], array + 0.5)


async def test_queue_positions_and_the_full_queue_in_redis(dispatcher, r):
    jobs = [await submit(dispatcher) for _ in range(3)]
    assert [dispatcher.queue_position(job) for job in jobs] == [1, 2, 3]
    with pytest.raises(QueueFull):
        await submit(dispatcher)
    r.xreadgroup(GROUP, "someone", {KEYS.queue("tiny"): ">"}, count=1)  # a worker claims the first
    await dispatcher.refresh()
    assert [dispatcher.queue_position(job) for job in jobs] == [None, 1, 2]
    await dispatcher.cancel(jobs[2])  # a cancelled queued job leaves the queue at once
    await submit(dispatcher)


async def test_a_worker_whose_engine_died_hands_its_jobs_back_and_stops(dispatcher, r, redis_server):
    worker = Worker(settings(redis_server), {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w")
    thread = threading.Thread(target=worker.run)
    thread.start()
    job = await submit(dispatcher, n=8, steps=50)
    deadline = time.monotonic() + 20
    while status(r, job.id) != "running":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    worker.pool.stop(5)  # as if the engine thread had crashed
    thread.join(20)
    assert not thread.is_alive() and worker.engine_died
    [pending] = r.xpending_range(KEYS.queue("tiny"), GROUP, min="-", max="+", count=10)
    assert pending["time_since_delivered"] > 400  # handed back: idle past the reclaim time, others take it
    assert not r.exists(KEYS.worker("w"))  # and gone from the live workers


async def test_a_worker_whose_engine_hangs_in_a_step_hands_its_jobs_back_and_stops(
    dispatcher, r, redis_server, caplog
):
    # Alive but stuck (a device call that never returns): heartbeats would keep its claims for ever.
    worker = Worker(
        settings(redis_server, engine_stall_seconds=1.0), {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w"
    )
    engine = worker.pool.engines["tiny"]
    stuck, release = threading.Event(), threading.Event()

    class Hanging:  # the engine's forward, but its fourth step of the job never ends
        def __init__(self, forward):
            self.forward = forward

        def __getattr__(self, name):
            return getattr(self.forward, name)

        def __call__(self, x, t):
            if engine.forwards == 3:
                stuck.set()
                release.wait(60)
            return self.forward(x, t)

    engine.forward = Hanging(engine.forward)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        job = await submit(dispatcher, n=2, steps=50)
        assert await asyncio.to_thread(stuck.wait, 20)
        started = time.monotonic()
        await asyncio.to_thread(thread.join, 20)
        assert not thread.is_alive() and worker.engine_died
        assert time.monotonic() - started >= 0.9  # not before the limit
        assert "the engine of tiny has been in one step for over 1 s" in caplog.text
        [pending] = r.xpending_range(KEYS.queue("tiny"), GROUP, min="-", max="+", count=10)
        assert pending["time_since_delivered"] > 400  # handed back: others take it over at once
        assert status(r, job.id) == "running" and not r.exists(KEYS.worker("w"))
    finally:
        release.set()
        thread.join(20)


def test_an_engine_waiting_for_work_is_not_stalled():
    from app.engine.pool import EnginePool

    class Silent:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    pool = EnginePool({"tiny": tiny_checkpoint(timesteps=50)}, listener=Silent())
    pool.start()
    try:
        time.sleep(0.3)
        assert pool.engines["tiny"].stalled_for() == 0.0 and pool.stalled(0.1) == []
    finally:
        pool.stop(5)


async def test_consumers_of_vanished_workers_are_forgotten_unless_they_hold_entries(
    dispatcher, r, redis_server
):
    queue = KEYS.queue("tiny")
    for _ in range(3):
        await submit(dispatcher)
    r.xreadgroup(GROUP, "holder", {queue: ">"}, count=1)  # dead, but an entry is pending on it
    for name in ("gone", "alive"):  # both hold nothing; only "alive" heartbeats
        [[_, [(entry, _)]]] = r.xreadgroup(GROUP, name, {queue: ">"}, count=1)
        r.xack(queue, GROUP, entry)
    r.set(KEYS.worker("alive"), "{}")
    worker = Worker(settings(redis_server), {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w")
    assert worker.queue.prune_consumers() == 1
    assert {c["name"] for c in r.xinfo_consumers(queue, GROUP)} == {b"holder", b"alive"}


async def test_takeover_finds_a_dead_worker_s_entry_behind_many_live_ones(dispatcher, r, redis_server):
    queue = KEYS.queue("tiny")
    for _ in range(50):  # 150 jobs, all claimed by live workers (3 at a time: the queue holds 3)
        for _ in range(3):
            await submit(dispatcher)
        r.xreadgroup(GROUP, "live", {queue: ">"}, count=3)
    last = r.xrevrange(queue, count=1)[0][0]
    r.xclaim(queue, GROUP, "ghost", 0, [last], idle=10_000)  # the newest entry, on a dead worker
    # A reclaim time the live entries stay under while the test runs; the ghost's is far past it.
    worker_settings = settings(redis_server, reclaim_idle_seconds=5)
    worker = Worker(worker_settings, {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w")
    # One entry at a time, behind 149 live ones: XAUTOCLAIM with COUNT 1 would look at 10 per call.
    [taken] = worker.queue.take_over(1)
    assert taken.entry_id == last.decode() and taken.reclaimed and taken.deliveries == 3  # live, ghost, w
    assert worker.queue.take_over(1) == []  # now this worker's, and the live ones are not idle


def metric_value(text: str, sample: str) -> float:
    """One sample of Prometheus text (`name{labels}` exactly as exposed), 0 when absent."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_worker_reports_queue_wait_job_duration_and_device_memory_on_its_metrics_port(
    dispatcher, r, redis_server, monkeypatch
):
    import httpx

    from app.worker.main import metrics_server, serve_metrics
    from tests.redis_server import free_port

    calls: list[tuple[str | None, BaseException | None]] = []
    real = metrics.update_device_memory

    def spy(device: str | None = None) -> None:
        try:
            real(device)
        except BaseException as e:
            calls.append((device, e))
            raise
        calls.append((device, None))

    monkeypatch.setattr(metrics, "update_device_memory", spy)
    config = settings(redis_server, worker_metrics_port=free_port())
    server = serve_metrics(metrics_server(config))  # bound to DDPM_HOST, loopback unless set
    assert server.server_address[:2] == ("127.0.0.1", config.worker_metrics_port)
    url = f"http://127.0.0.1:{config.worker_metrics_port}/metrics"
    wait_sample = 'ddpm_queue_wait_seconds_count{kind="sample"}'
    job_sample = 'ddpm_job_duration_seconds_count{kind="sample"}'
    wait_sum = 'ddpm_queue_wait_seconds_sum{kind="sample"}'
    before = httpx.get(url, timeout=5).text
    worker = Worker(config, {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w")
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        job = await submit(dispatcher, n=2, steps=20)
        deadline = time.monotonic() + 30
        while status(r, job.id) != "succeeded":
            assert time.monotonic() < deadline, status(r, job.id)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # a few heartbeats (0.1 s)
        after = httpx.get(url, timeout=5).text
    finally:
        worker.stop()
        thread.join(30)
        server.shutdown()
        server.server_close()
    assert metric_value(after, wait_sample) == metric_value(before, wait_sample) + 1
    assert metric_value(after, job_sample) == metric_value(before, job_sample) + 1
    waited = metric_value(after, wait_sum) - metric_value(before, wait_sum)
    assert 0 <= waited < 30
    assert "# TYPE ddpm_device_memory_bytes gauge" in after
    assert len(calls) >= 3 and all(c == ("cpu", None) for c in calls), calls  # at start, then every beat


def test_device_memory_is_read_for_the_worker_s_own_cuda_device_and_never_on_a_cpu(monkeypatch):
    import torch

    read: list[int] = []

    def allocated(index: int) -> int:
        read.append(index)
        return 1000 + index

    metrics.update_device_memory("cpu")  # no CUDA needed, nothing read
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)
    gauge = metrics.DEVICE_MEMORY_BYTES
    try:
        metrics.update_device_memory("cpu")
        assert read == []
        metrics.update_device_memory("cuda:1")
        assert read == [1] and gauge.labels(device="cuda:1")._value.get() == 1001
        metrics.update_device_memory("cuda")  # the current device
        assert read == [1, 0] and gauge.labels(device="cuda:0")._value.get() == 1000
        metrics.update_device_memory()  # the API: every device
        assert read == [1, 0, 0, 1]
    finally:
        for device in ("cuda:0", "cuda:1"):
            with contextlib.suppress(KeyError):
                gauge.remove(device)


def idle_on_ghost(r: redis.Redis, count: int) -> list[bytes]:
    """The queue's next `count` entries, taken by a worker that died (idle well past the reclaim time)."""
    queue = KEYS.queue("tiny")
    [(_, entries)] = r.xreadgroup(GROUP, "ghost", {queue: ">"}, count=count)
    ids = [entry_id for entry_id, _ in entries]
    r.xclaim(queue, GROUP, "ghost", 0, ids, idle=10_000)
    return ids


async def test_a_worker_ends_a_job_whose_running_mark_redis_lost(dispatcher, r, redis_server):
    """Redis restarted from a file without its last second: the job reads `queued` again, but the worker
    that holds its entry ran it; its end is recorded, not refused (the entry would be acknowledged and
    the job left queued with no entry)."""
    job = await submit(dispatcher)
    writer = JobWriter(sync_client(redis_server.url), 60)
    done = (EventType.DONE, {"status": "succeeded"})
    assert (
        writer.end(job.id, Status.SUCCEEDED, done, {"result": {"image_count": 1}}, {"0.png": b"png"}) == ENDED
    )
    assert status(r, job.id) == "succeeded" and r.hget(KEYS.results(job.id), "0.png") == b"png"
    assert final_events(r, job.id) == [b"done"]


async def test_a_job_cancelled_after_a_worker_read_it_is_stopped_and_gets_nothing_more(
    dispatcher, r, redis_server
):
    """Cancelled while queued, just after a worker took its entry: the worker's start is refused, so it
    stops the job in its engine at once, and its progress never lands after the `done` event."""
    job = await submit(dispatcher)
    r.xreadgroup(GROUP, "w", {KEYS.queue("tiny"): ">"}, count=1)
    await dispatcher.cancel(job)
    assert status(r, job.id) == "cancelled"
    stopped: list[tuple[str, str]] = []
    listener = RedisListener(JobWriter(sync_client(redis_server.url), 60), on_end=lambda *_: None)
    listener.stop_job = lambda job_id, model: stopped.append((job_id, model))
    listener.watch(Work(job.id, "sample", "tiny", {"n": 1}))
    listener.on_started(job.id, 50)
    listener.on_progress(job.id, 1, 50, 49, torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    listener.close(time.monotonic() + 5)
    assert stopped == [(job.id, "tiny")]
    assert [f[b"type"] for _, f in r.xrange(KEYS.events(job.id))] == [b"done"]
    record = r.hgetall(KEYS.job(job.id))
    assert record[b"status"] == b"cancelled" and record[b"step"] == b"0" and record[b"started_at"] == b"null"


async def test_a_failed_acknowledgement_is_retried_and_lands(dispatcher, r, redis_server, monkeypatch):
    job = await submit(dispatcher)
    worker = Worker(settings(redis_server), {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w")
    [delivery] = worker.queue.read(count=1, block_ms=100)
    worker._claims[job.id] = Claim(delivery, Work(job.id, "sample", "tiny", {"n": 1}), rows=1)
    attempts: list[str] = []
    ack = worker.queue.ack

    def flaky(d):
        attempts.append(d.entry_id)
        if len(attempts) == 1:
            raise redis.ConnectionError("a blip")
        ack(d)

    monkeypatch.setattr(worker.queue, "ack", flaky)
    worker.listener._retry(lambda: worker._ended(job.id, True))  # as the listener acknowledges an end
    assert attempts == [delivery.entry_id] * 2
    assert worker._claims == {} and worker.free_rows() == 8
    assert r.xpending(KEYS.queue("tiny"), GROUP)["pending"] == 0 and r.xlen(KEYS.queue("tiny")) == 0


async def test_an_entry_over_the_delivery_limit_of_a_job_that_ended_is_acknowledged_not_dead_lettered(
    dispatcher, r, redis_server
):
    job = await submit(dispatcher)
    idle_on_ghost(r, 1)  # it finished the job, then died before acknowledging its entry
    JobWriter(sync_client(redis_server.url), 60).end(
        job.id, Status.SUCCEEDED, (EventType.DONE, {"status": "succeeded"}), {"result": {"image_count": 1}}
    )
    worker = Worker(
        settings(redis_server, max_deliveries=1), {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w"
    )
    assert worker._take_over()
    assert status(r, job.id) == "succeeded" and final_events(r, job.id) == [b"done"]
    assert r.xlen(KEYS.dead_letter("tiny")) == 0
    assert r.xlen(KEYS.queue("tiny")) == 0 and r.xpending(KEYS.queue("tiny"), GROUP)["pending"] == 0


async def test_a_redis_error_at_start_up_starts_each_leftover_once(dispatcher, r, redis_server, monkeypatch):
    """A worker restarted under its old name resumes its pending entries; Redis errors half-way through
    retry only what failed: nothing is submitted twice, and the entries are claimed once."""
    jobs = [await submit(dispatcher) for _ in range(2)]
    r.xreadgroup(GROUP, "w", {KEYS.queue("tiny"): ">"}, count=2)  # the previous process's
    worker = Worker(settings(redis_server), {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w")
    submitted: list[str] = []
    monkeypatch.setattr(worker.pool, "submit", lambda work: submitted.append(work.job_id))
    reads = worker.writer.status_and_created
    calls = [0]

    def flaky(job_id):
        calls[0] += 1
        if calls[0] == 2:
            raise redis.ConnectionError("a blip")
        return reads(job_id)

    monkeypatch.setattr(worker.writer, "status_and_created", flaky)
    # A second model's queue, read after the first's entries were claimed back: a blip there must not
    # claim (and count) the first queue's entries again.
    other = KEYS.queue("other")
    monkeypatch.setitem(worker.queue.queues, other, "other")
    pending_of = worker.redis.xpending_range
    failed = []

    def blip_on_the_second_queue(name, *args, **kwargs):
        if name == other and not failed:
            failed.append(name)
            raise redis.ConnectionError("a blip")
        return pending_of(name, *args, **kwargs)

    monkeypatch.setattr(worker.redis, "xpending_range", blip_on_the_second_queue)
    worker._announce()
    assert failed == [other]
    assert submitted == [job.id for job in jobs]
    pending = r.xpending_range(KEYS.queue("tiny"), GROUP, min="-", max="+", count=10)
    assert [p["times_delivered"] for p in pending] == [2, 2]  # read once, claimed back once
    assert sorted(worker._claims) == sorted(job.id for job in jobs)


async def test_a_takeover_claims_one_job_at_a_time_not_one_per_free_row(
    dispatcher, r, redis_server, monkeypatch
):
    jobs = [await submit(dispatcher, n=8) for _ in range(2)]
    ids = idle_on_ghost(r, 2)
    worker = Worker(settings(redis_server, max_batch=4), {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w")
    submitted: list[str] = []
    monkeypatch.setattr(worker.pool, "submit", lambda work: submitted.append(work.job_id))
    assert worker._take_over()
    assert submitted == [jobs[0].id] and worker.free_rows() == -4  # full: the claim loop takes no more
    owners = {
        p["message_id"]: p["consumer"] for p in r.xpending_range(KEYS.queue("tiny"), GROUP, "-", "+", 10)
    }
    assert owners == {ids[0]: b"w", ids[1]: b"ghost"}


def test_a_worker_stopped_before_redis_ever_answered_does_not_say_it_served(caplog):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    worker_settings = Settings(redis_url=url, device="cpu", max_batch=8, worker_heartbeat_seconds=0.1)
    worker = Worker(worker_settings, {"tiny": tiny_checkpoint(timesteps=50)}, sync_client(url), name="w")
    threading.Timer(0.5, worker.stop).start()
    with caplog.at_level("INFO", logger="app.worker"):
        worker.run()
    assert "Redis unavailable" in caplog.text and "worker w: stopped" in caplog.text
    assert "serving" not in caplog.text
