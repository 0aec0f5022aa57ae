"""The job runner: engine callbacks (from another thread) become ordered events, status and results."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from app import metrics
from app.engine.work import Work
from app.jobs import EventType, JobRecord, MemoryJobStore, Status
from app.jobs.runner import JobRunner

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def start(store, job_id: str, *, n: int = 2, stream_every: int = 1) -> JobRunner:
    runner = JobRunner(store, asyncio.get_running_loop())
    await store.create(JobRecord(id=job_id, kind="sample", model="tiny", params={"n": n}))
    runner.watch(
        Work(job_id=job_id, kind="sample", model="tiny", params={"n": n, "stream_every": stream_every})
    )
    return runner


async def on_engine_thread(fn) -> None:
    """Run `fn` on another thread, as the engine would, without blocking the event loop."""
    thread = threading.Thread(target=fn)
    thread.start()
    await asyncio.to_thread(thread.join)


async def finish(store, runner: JobRunner, job_id: str) -> list:
    events = await asyncio.wait_for(_all(store, job_id), 5)
    await asyncio.to_thread(runner.close)
    await runner.drain()
    return events


async def _all(store, job_id):
    return [e async for e in store.events(job_id)]


def frames(n: int, value: float) -> torch.Tensor:
    return torch.full((n, 1, 8, 8), value)


async def test_a_job_runs_to_ordered_previews_results_and_done():
    store = MemoryJobStore(ttl_seconds=60)
    runner = await start(store, "j1")

    def engine() -> None:
        runner.on_started("j1", 3)
        for step in (1, 2, 3):
            runner.on_progress("j1", step, 3, 3 - step, frames(2, step / 3 - 0.5), frames(2, 0.0))
        runner.on_finished("j1", torch.linspace(-1, 1, 2 * 64).reshape(2, 1, 8, 8), {})

    await on_engine_thread(engine)
    events = await finish(store, runner, "j1")
    assert [e.type for e in events] == [EventType.PROGRESS] * 3 + [EventType.DONE]
    assert [e.data["step"] for e in events[:3]] == [1, 2, 3]
    assert [e.id for e in events] == [1, 2, 3, 4]
    preview = Image.open(io.BytesIO(base64.b64decode(events[0].data["x0"][1])))
    assert preview.size == (8, 8) and len(events[0].data["x0"]) == 2 and len(events[0].data["xt"]) == 2
    job = await store.get("j1", owner=None)
    assert job.status is Status.SUCCEEDED and (job.step, job.steps) == (3, 3)
    assert job.result == {"image_count": 2}
    one = np.load(io.BytesIO(await store.get_result("j1", "1.npy")))
    assert one.shape == (1, 1, 8, 8) and one.dtype == np.float32 and one.max() == pytest.approx(1.0)
    assert Image.open(io.BytesIO(await store.get_result("j1", "0.png"))).size == (8, 8)
    assert Image.open(io.BytesIO(await store.get_result("j1", "grid.png"))).size[0] > 16


async def test_only_reports_with_images_become_progress_events():
    store = MemoryJobStore(ttl_seconds=60)
    runner = await start(store, "j2", stream_every=2)

    def engine() -> None:
        runner.on_started("j2", 5)
        for step in range(1, 6):
            images = frames(2, 0.0) if step in (2, 4, 5) else None  # the engine picks preview steps
            runner.on_progress("j2", step, 5, 5 - step, images, images)
        runner.on_finished("j2", frames(2, 0.0), {})

    await on_engine_thread(engine)
    events = await finish(store, runner, "j2")
    assert [e.data.get("step") for e in events if e.type is EventType.PROGRESS] == [2, 4, 5]


async def test_image_free_reports_move_the_step():
    store = MemoryJobStore(ttl_seconds=60)
    runner = await start(store, "j5", stream_every=0)
    await on_engine_thread(
        lambda: (runner.on_started("j5", 9), runner.on_progress("j5", 3, 9, 6, None, None))
    )
    for _ in range(100):
        job = await store.get("j5", owner=None)
        if job.step == 3:
            break
        await asyncio.sleep(0.02)
    assert (job.step, job.steps) == (3, 9)
    runner.on_finished("j5", frames(2, 0.0), {})
    events = await finish(store, runner, "j5")
    assert not [e for e in events if e.type is EventType.PROGRESS]


async def test_a_failure_is_recorded_with_an_error_event():
    store = MemoryJobStore(ttl_seconds=60)
    runner = await start(store, "j3")

    def engine() -> None:
        runner.on_started("j3", 4)
        runner.on_failed("j3", "non_finite", "x_t became NaN at step 2")

    await on_engine_thread(engine)
    events = await finish(store, runner, "j3")
    assert events[-1].type is EventType.ERROR and events[-1].data["code"] == "non_finite"
    job = await store.get("j3", owner=None)
    assert job.status is Status.FAILED and job.error["message"] == "x_t became NaN at step 2"


async def test_a_cancel_that_loses_the_race_with_the_end_changes_nothing():
    store = MemoryJobStore(ttl_seconds=60)
    runner = await start(store, "j4")

    def engine() -> None:
        runner.on_started("j4", 1)
        runner.on_finished("j4", frames(2, 0.0), {})
        runner.on_cancelled("j4")

    await on_engine_thread(engine)
    events = await finish(store, runner, "j4")
    assert [e.type for e in events] == [EventType.DONE]
    assert (await store.get("j4", owner=None)).status is Status.SUCCEEDED


async def test_many_jobs_interleaved_keep_their_own_order():
    store = MemoryJobStore(ttl_seconds=60)
    runner = JobRunner(store, asyncio.get_running_loop(), encoders=3)
    ids = [f"m{i}" for i in range(6)]
    for job_id in ids:
        await store.create(JobRecord(id=job_id, kind="sample", model="tiny", params={}))
        runner.watch(Work(job_id=job_id, kind="sample", model="tiny", params={"stream_every": 1}))

    def engine() -> None:
        for job_id in ids:
            runner.on_started(job_id, 20)
        for step in range(1, 21):
            for job_id in ids:
                runner.on_progress(job_id, step, 20, 20 - step, frames(1, 0.0), frames(1, 0.0))
        for job_id in ids:
            runner.on_finished(job_id, frames(1, 0.0), {})

    await on_engine_thread(engine)
    for job_id in ids:
        events = await asyncio.wait_for(_all(store, job_id), 5)
        assert [e.data.get("step") for e in events[:-1]] == list(range(1, 21))
        assert events[-1].type is EventType.DONE
    await asyncio.to_thread(runner.close)
    await runner.drain()


async def test_an_interpolation_grid_has_a_row_per_t_and_a_column_per_lambda():
    store = MemoryJobStore(ttl_seconds=60)
    runner = JobRunner(store, asyncio.get_running_loop())
    params = {
        "t": [3, 6],
        "lambdas": [0.0, 0.25, 0.5, 0.75, 1.0],
        "steps": None,
        "seed": 1,
        "stream_every": 0,
    }
    await store.create(JobRecord(id="i1", kind="interpolate", model="tiny", params=params))
    runner.watch(Work(job_id="i1", kind="interpolate", model="tiny", params=params))
    extra = {"rows": 2, "columns": 5}
    await on_engine_thread(
        lambda: (runner.on_started("i1", 6), runner.on_finished("i1", frames(10, 0.0), extra))
    )
    await finish(store, runner, "i1")
    # 8×8 images with a 2-pixel border: 5 columns, 2 rows (near-square would be 4 × 3).
    assert Image.open(io.BytesIO(await store.get_result("i1", "grid.png"))).size == (5 * 10 + 2, 2 * 10 + 2)
    assert (await store.get("i1", owner=None)).result == {**extra, "image_count": 10}


async def test_a_likelihood_result_is_its_numbers_without_images():
    store = MemoryJobStore(ttl_seconds=60)
    runner = JobRunner(store, asyncio.get_running_loop())
    await store.create(JobRecord(id="l1", kind="likelihood", model="tiny", params={}))
    runner.watch(Work(job_id="l1", kind="likelihood", model="tiny", params={"seed": 1, "curve": False}))
    extra = {"bits_per_dim": [3.5], "terms": {"prior": [0.5], "diffusion": [2.0], "decoder": [1.0]}}
    await on_engine_thread(
        lambda: (runner.on_started("l1", 10), runner.on_finished("l1", torch.empty(0), extra))
    )
    events = await finish(store, runner, "l1")
    job = await store.get("l1", owner=None)
    assert job.status is Status.SUCCEEDED and events[-1].type is EventType.DONE
    assert job.result == {**extra, "image_count": 0}
    assert await store.get_result("l1", "grid.png") is None and await store.get_result("l1", "0.npy") is None


async def test_a_preview_that_cannot_be_encoded_fails_the_job_stops_it_and_nothing_follows(monkeypatch):
    import app.jobs.runner as runner_module

    store = MemoryJobStore(ttl_seconds=60)
    runner = await start(store, "e1")
    stopped: list[tuple[str, str]] = []
    stop = threading.Event()
    runner.stop_job = lambda job_id, model: (stopped.append((job_id, model)), stop.set())
    encode = runner_module.preview_pngs

    def broken(x):
        if float(x.mean()) == 0.25:  # step 2's preview
            raise MemoryError("out of memory encoding a PNG")
        return encode(x)

    monkeypatch.setattr(runner_module, "preview_pngs", broken)
    failed = metrics.JOBS.labels(kind="sample", outcome="failed")
    before = failed._value.get()

    def engine() -> None:
        runner.on_started("e1", 4)
        for step in (1, 2, 3):  # the engine goes on until the cancel reaches it
            runner.on_progress("e1", step, 4, 4 - step, frames(2, step / 4 - 0.25), frames(2, 0.0))
        assert stop.wait(5), "the runner did not stop the job"
        runner.on_cancelled("e1")

    await on_engine_thread(engine)
    events = await finish(store, runner, "e1")
    assert [e.type for e in events] == [EventType.PROGRESS, EventType.ERROR]  # nothing after the error
    assert events[-1].data["code"] == "encoding_failed" and "(MemoryError)" in events[-1].data["message"]
    job = await store.get("e1", owner=None)
    assert job.status is Status.FAILED and job.step == 1
    assert stopped == [("e1", "tiny")] and failed._value.get() == before + 1
    assert not runner.ending("e1") and len(runner._broken) == 0


async def test_images_that_cannot_be_encoded_fail_the_job_and_count_as_failed(monkeypatch):
    import app.jobs.runner as runner_module

    def broken(images, **kwargs):
        raise MemoryError("out of memory encoding a PNG")

    monkeypatch.setattr(runner_module, "result_blobs", broken)
    store = MemoryJobStore(ttl_seconds=60)
    runner = await start(store, "e2")
    stopped: list[tuple[str, str]] = []
    runner.stop_job = lambda job_id, model: stopped.append((job_id, model))
    outcomes = {o: metrics.JOBS.labels(kind="sample", outcome=o) for o in ("failed", "succeeded")}
    before = {o: counter._value.get() for o, counter in outcomes.items()}
    images = metrics.IMAGES.labels(model="tiny")
    images_before = images._value.get()

    def engine() -> None:
        runner.on_started("e2", 2)
        runner.on_progress("e2", 1, 2, 1, None, None)
        runner.on_finished("e2", frames(2, 0.0), {})

    await on_engine_thread(engine)
    events = await finish(store, runner, "e2")
    error = {
        "code": "encoding_failed",
        "message": "could not encode the job's images (MemoryError); the server log has the details",
    }
    assert [(e.type, e.data) for e in events] == [(EventType.ERROR, error)]
    job = await store.get("e2", owner=None)
    assert job.status is Status.FAILED and job.error == error and job.result is None
    assert job.finished_at is not None
    assert await store.get_result("e2", "0.png") is None and await store.get_result("e2", "grid.png") is None
    after = {o: counter._value.get() for o, counter in outcomes.items()}
    assert after == {"failed": before["failed"] + 1, "succeeded": before["succeeded"]}
    assert images._value.get() == images_before  # no images were produced
    assert stopped == [] and not runner.ending("e2")  # the engine had ended it: nothing to stop
