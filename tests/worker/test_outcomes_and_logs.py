"""Distributed mode's job outcomes counted once, by the process that wrote the end (ddpm_jobs_total,
ddpm_worker_duplicate_ends_total); failures and Redis outages logged once, without the job's inputs;
the queue depth exported by the API with no worker up."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.requests import Request

from app import metrics
from app.api import redis_dispatch
from app.api import service as service_module
from app.api.dispatch import CancelOutcome
from app.api.redis_dispatch import RedisDispatcher
from app.api.service import JobService
from app.jobs import EventType, JobRecord, Status
from app.jobs.memory import MemoryJobStore
from app.jobs.redis_keys import GROUP
from app.jobs.redis_store import RedisJobStore
from app.jobs.redis_writer import ENDED
from app.jobs.registry import ModelSpec
from app.settings import Settings
from app.worker import Worker
from tests.redis_server import RedisServer
from tests.tiny import tiny_checkpoint
from tests.worker.test_worker import KEYS, settings, status, submit

pytestmark = pytest.mark.anyio

OUTCOMES = ("succeeded", "failed", "cancelled")


@pytest.fixture
async def dispatcher(redis_server, r) -> AsyncIterator[RedisDispatcher]:
    """The API's side, as in test_worker.py: the model `tiny` published, as a worker would."""
    r.hset(KEYS.models, "tiny", ModelSpec.of(tiny_checkpoint(timesteps=50)).to_json())
    store = RedisJobStore.from_url(redis_server.url, 60)
    dispatcher = await RedisDispatcher.open(settings(redis_server), store)
    yield dispatcher
    await dispatcher.close()
    await store.close()


def counts(kind: str = "sample") -> dict[str, float]:
    """ddpm_jobs_total by outcome for `kind`, and the duplicate ends of `tiny` (the registry is the
    process's: compare before and after)."""
    values = {o: metrics.JOBS.labels(kind=kind, outcome=o)._value.get() for o in OUTCOMES}
    return values | {"duplicate": metrics.DUPLICATE_ENDS.labels(model="tiny")._value.get()}


def increase(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before if after[name] != before[name]}


def make_worker(redis_server, r, monkeypatch, **overrides) -> tuple[Worker, list[str]]:
    """A worker whose engine never starts what it is given (the job stays claimed, not started)."""
    worker = Worker(settings(redis_server, **overrides), {"tiny": tiny_checkpoint(timesteps=50)}, r, name="w")
    submitted: list[str] = []
    monkeypatch.setattr(worker.pool, "submit", lambda work: submitted.append(work.job_id))
    return worker, submitted


async def test_a_cancel_of_a_claimed_job_its_engine_had_not_started_counts_once_and_is_no_duplicate(
    dispatcher, r, redis_server, monkeypatch, caplog
):
    """The API's CANCEL ends the job (still queued) and counts it; the worker's engine then reports the
    cancellation its poller asked for: the worker finds the job cancelled, records and counts nothing,
    and it is not a duplicate end (a takeover race)."""
    job = await submit(dispatcher)
    worker, submitted = make_worker(redis_server, r, monkeypatch)
    worker._start_all(worker.queue.read(count=1, block_ms=100))
    assert submitted == [job.id] and status(r, job.id) == "queued"
    before = counts()
    assert await dispatcher.cancel(job) is CancelOutcome.REQUESTED
    assert status(r, job.id) == "cancelled"
    assert increase(before, counts()) == {"cancelled": 1}  # counted by the API, which ended it
    assert await dispatcher.cancel(job) is CancelOutcome.REQUESTED  # a second DELETE (or a racing one)
    assert increase(before, counts()) == {"cancelled": 1}  # ends nothing, counts nothing
    with caplog.at_level(logging.INFO, logger="app.worker.listener"):
        worker.listener.on_cancelled(job.id)  # the engine's answer to the worker's cancel
        worker.listener.close(time.monotonic() + 10)
    assert increase(before, counts()) == {"cancelled": 1}
    assert "already ended" not in caplog.text
    assert worker._claims == {} and r.xpending(KEYS.queue("tiny"), GROUP)["pending"] == 0


async def test_a_job_another_worker_ended_is_a_duplicate_end(dispatcher, r, redis_server, monkeypatch):
    job = await submit(dispatcher)
    worker, _ = make_worker(redis_server, r, monkeypatch)
    worker._start_all(worker.queue.read(count=1, block_ms=100))
    done = (EventType.DONE, {"status": "succeeded"})
    assert worker.writer.end(job.id, Status.SUCCEEDED, done, {"result": {"image_count": 0}}) == ENDED
    before = counts()  # another worker (after a takeover) ended it first, and counted it
    worker.listener.on_failed(job.id, "job_error", "boom")  # then this worker's engine ends it too
    worker.listener.close(time.monotonic() + 10)
    assert status(r, job.id) == "succeeded"
    assert increase(before, counts()) == {"duplicate": 1}


async def test_a_cancel_the_api_ends_itself_counts_there_and_not_again_when_the_worker_ends_it(
    dispatcher, r, redis_server, monkeypatch
):
    """Marked for cancellation, running on a worker that does not confirm in time: the API ends the job
    (counted there); the worker's late end finds it cancelled and counts nothing."""
    job = await submit(dispatcher)
    worker, _ = make_worker(redis_server, r, monkeypatch)
    worker._start_all(worker.queue.read(count=1, block_ms=100))
    worker.listener.on_started(job.id, 50)
    deadline = time.monotonic() + 10
    while status(r, job.id) != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    monkeypatch.setattr(service_module, "CANCEL_WAIT_SECONDS", 0.2)
    service = JobService(settings(redis_server), dispatcher.store, dispatcher)
    before = counts()
    ended = await service.cancel(await service.get(job.id, None))
    assert ended.status is Status.CANCELLED
    assert increase(before, counts()) == {"cancelled": 1}
    worker.listener.on_cancelled(job.id)
    worker.listener.close(time.monotonic() + 10)
    assert increase(before, counts()) == {"cancelled": 1}


async def test_an_end_the_api_writes_in_embedded_mode_counts_once():
    """Embedded, an engine that died cannot end the job: the API does, and counts it, once."""

    class DeadEngine:
        async def cancel(self, job: JobRecord) -> CancelOutcome:
            return CancelOutcome.NO_RUNNER

    store = MemoryJobStore(60)
    service = JobService(Settings(), store, DeadEngine())
    job = JobRecord(id="embedded-job", kind="sample", model="tiny", params={"n": 1}, steps=50)
    await store.create(job)
    before = counts()
    assert (await service.cancel(job)).status is Status.CANCELLED
    await service._end(job.id, Status.CANCELLED)  # a second end writes nothing, and counts nothing
    assert increase(before, counts()) == {"cancelled": 1}


async def test_a_job_the_worker_fails_before_running_it_is_counted_and_logged_without_its_inputs(
    dispatcher, r, redis_server, monkeypatch, caplog
):
    job = await submit(dispatcher)
    worker, submitted = make_worker(redis_server, r, monkeypatch)
    [delivery] = worker.queue.read(count=1, block_ms=100)
    garbled = dataclasses.replace(delivery, fields={**delivery.fields, b"params": b'{"n": 1, "steps'})
    before = counts()
    with caplog.at_level(logging.INFO, logger="app.worker.worker"):
        worker._start_all([garbled])
    assert submitted == [] and status(r, job.id) == "failed"
    assert increase(before, counts()) == {"failed": 1}
    [record] = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    text = record.getMessage()
    assert job.id in text and "tiny" in text and "invalid_job" in text
    message = json.loads(r.hget(KEYS.job(job.id), "error"))["message"]
    assert message not in text and "Unterminated" not in text  # what the job was sent stays out


async def test_a_dead_lettered_job_is_counted_as_failed(dispatcher, r, redis_server, monkeypatch, caplog):
    job = await submit(dispatcher)
    r.xreadgroup(GROUP, "ghost", {KEYS.queue("tiny"): ">"}, count=1)  # a worker that takes it and dies
    worker, _ = make_worker(redis_server, r, monkeypatch, max_deliveries=1)
    time.sleep(0.45)  # past the reclaim time
    before = counts()
    with caplog.at_level(logging.WARNING, logger="app.worker.worker"):
        worker._start_all(worker.queue.take_over(8))
    assert status(r, job.id) == "failed" and increase(before, counts()) == {"failed": 1}
    assert any(job.id in rec.getMessage() and "worker_lost" in rec.getMessage() for rec in caplog.records)


async def test_the_api_exports_the_queue_depth_with_no_worker_up(dispatcher, r):
    gauge = metrics.QUEUE_WAITING.labels(model="tiny")
    jobs = [await submit(dispatcher) for _ in range(2)]
    await dispatcher.refresh()
    assert gauge._value.get() == 2
    await dispatcher.cancel(jobs[0])
    await dispatcher.refresh()
    assert gauge._value.get() == 1
    assert "API replica" in metrics.QUEUE_WAITING._documentation
    r.hdel(KEYS.models, "tiny")  # no worker publishes it any more: its series goes (it stayed at 1)
    await dispatcher.refresh()
    assert ("tiny",) not in metrics.QUEUE_WAITING._metrics


async def test_a_redis_outage_is_logged_once_when_it_begins_and_once_when_it_ends(tmp_path, caplog):
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    store = RedisJobStore.from_url(server.url, 60)
    try:
        with caplog.at_level(logging.INFO, logger="app.api.redis_dispatch"):
            dispatcher = await RedisDispatcher.open(Settings(redis_url=server.url), store)
            assert caplog.records == []
            server.stop()
            for _ in range(4):  # what the background refresh, /readyz and every request find
                with pytest.raises(RedisConnectionError):
                    await dispatcher.refresh()
                assert await dispatcher.unready() is not None
            down = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
            assert len(down) == 1 and "unreachable" in down[0].getMessage(), caplog.text
            assert f"127.0.0.1:{server.port}" in down[0].getMessage()
            server.start()
            await dispatcher.refresh()
            await dispatcher.refresh()
            up = [rec for rec in caplog.records if rec.levelno == logging.INFO]
            assert len(up) == 1 and "answers again" in up[0].getMessage(), caplog.text
            assert len([rec for rec in caplog.records if rec.levelno == logging.WARNING]) == 1
            await dispatcher.close()
    finally:
        await store.close()
        server.stop()


async def test_the_503s_of_a_redis_outage_are_logged_but_not_each_one(monkeypatch, caplog):
    monkeypatch.setattr(redis_dispatch, "_last_503_log", -math.inf)
    app = FastAPI()
    app.state.settings = Settings(redis_url="redis://127.0.0.1:1/0")
    request = Request({"type": "http", "method": "GET", "path": "/models", "headers": [], "app": app})
    with caplog.at_level(logging.INFO, logger="app.api.redis_dispatch"):
        for _ in range(5):
            response = await redis_dispatch._redis_unavailable(request, RedisConnectionError("refused"))
            assert response.status_code == 503
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "redis_unavailable" in record.getMessage()
