"""A job's stored previews stay within its byte budget (DDPM_MAX_PREVIEW_BYTES) in embedded mode: x_t
within half of it, then x̂₀, then progress events without images; the step/t progress still flows."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from app.engine.work import Work
from app.jobs import EventType, JobRecord, MemoryJobStore
from app.jobs.encoding import preview_pngs
from app.jobs.previews import BUDGET_PARAM, EXHAUSTED, PreviewBudget
from app.jobs.runner import JobRunner

pytestmark = pytest.mark.anyio

STEPS = 30


def noise(n: int, step: int) -> torch.Tensor:
    """Incompressible frames: every preview's PNGs are about as large as can be."""
    return torch.rand((n, 1, 8, 8), generator=torch.Generator().manual_seed(step)) * 2 - 1


def sizes(data: dict, name: str) -> int:
    return sum(len(text) for text in data.get(name, []))


def check_within(previews: list[dict], budget: int) -> None:
    """The rule of app/jobs/previews.py, as clients see it."""
    assert [p["step"] for p in previews] == list(range(1, STEPS + 1))  # progress flows to the end
    assert sum(sizes(p, "x0") + sizes(p, "xt") for p in previews) <= budget
    assert sum(sizes(p, "xt") for p in previews) <= budget // 2
    with_x0 = [p["step"] for p in previews if p["x0"]]
    with_xt = [p["step"] for p in previews if "xt" in p]
    assert with_x0 == list(range(1, len(with_x0) + 1)) and 1 < len(with_x0) < STEPS
    assert with_xt == list(range(1, len(with_xt) + 1)) and 0 < len(with_xt) < len(with_x0)
    for p in previews[len(with_x0) :]:  # once x̂₀ no longer fits, no later event has images
        assert p["x0"] == [] and p[EXHAUSTED] is True and "xt" not in p
    assert not any(EXHAUSTED in p for p in previews[: len(with_x0)])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_the_runner_stores_previews_within_the_jobs_budget():
    one = sum(len(text) for text in preview_pngs(noise(4, 1)))
    budget = 6 * one  # room for a few of the 30 previews
    store = MemoryJobStore(ttl_seconds=60)
    runner = JobRunner(store, asyncio.get_running_loop())
    await store.create(JobRecord(id="b1", kind="sample", model="tiny", params={"n": 4}))
    params = {"n": 4, "stream_every": 1, BUDGET_PARAM: budget}
    runner.watch(Work(job_id="b1", kind="sample", model="tiny", params=params))

    def engine() -> None:
        runner.on_started("b1", STEPS)
        for step in range(1, STEPS + 1):
            runner.on_progress("b1", step, STEPS, STEPS - step, noise(4, step), noise(4, -step))
        runner.on_finished("b1", noise(4, 0), {})

    thread = threading.Thread(target=engine)
    thread.start()
    await asyncio.to_thread(thread.join)
    events = await asyncio.wait_for(_all(store, "b1"), 10)
    await asyncio.to_thread(runner.close)
    await runner.drain()
    assert events[-1].type is EventType.DONE
    check_within([e.data for e in events if e.type is EventType.PROGRESS], budget)
    assert await store.get_result("b1", "3.png") is not None  # the results are not the previews'


def test_a_budget_of_zero_keeps_progress_without_images_and_work_without_one_gets_the_default():
    budget = PreviewBudget.of({BUDGET_PARAM: 0})
    data = budget.event(5, 10, 4, noise(2, 1), noise(2, 2))
    assert data == {"step": 5, "steps": 10, "t": 4, "x0": [], EXHAUSTED: True}
    assert PreviewBudget.of({"stream_every": 1}).limit == 8 * 1024 * 1024


async def _all(store, job_id):
    return [e async for e in store.events(job_id)]
