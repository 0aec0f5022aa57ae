"""Pieces shared by the job-creating routes: the decorator, the request's context (`NewJobDep`),
documented error answers and the 202/200 reply."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response

from app import metrics
from app.api import schemas
from app.api.deps import OwnerDep, ServiceDep, SettingsDep, WaitDep
from app.api.errors import invalid
from app.api.service import JobService, ModelEntry
from app.jobs import JobRecord
from app.settings import Settings

Route = TypeVar("Route", bound=Callable[..., Any])
log = logging.getLogger(__name__)
DISCONNECT_POLL_SECONDS = 0.5  # how often a waiting POST looks whether its client is still there


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries with the error shape, for the given statuses."""
    return {status: {"model": schemas.ErrorResponse} for status in statuses}


CREATED = {
    200: {"model": schemas.Job, "description": "the job, after it ended (with ?wait=true or Prefer: wait=N)"},
    **errors(400, 401, 404, 413, 422, 429, 503),
}

# Routes that can take an image of an earlier job: 409 while that job has not succeeded.
CREATED_FROM_JOB = {**CREATED, **errors(409)}


def default_t(entry: ModelEntry, max_steps: int) -> int:
    """The t of interpolation and reconstruction when none is given: halfway, the paper's t = 500 of 1000,
    or the most steps the server allows (`max_steps`) if that is less: a request that names no t is not
    refused for one it did not ask for."""
    return max(1, min(entry.timesteps // 2, max_steps))


async def reply(
    service: JobService,
    job: JobRecord,
    wait: float | None,
    response: Response,
    request: Request,
) -> schemas.Job:
    """202 with the queued job at once, or 200 with the job once it ended (or `wait` seconds passed).
    A waiting request stops waiting when its client goes away (`request`); the job goes on."""
    response.headers["Location"] = f"/jobs/{job.id}"  # also on a 200: the wait may end before the job
    if wait is None:
        return service.render(job)
    if math.isfinite(wait):  # RFC 7240: say that `Prefer: wait=N` was honoured
        response.headers["Preference-Applied"] = f"wait={wait:g}"
    with metrics.WAITING_REQUESTS.track_inprogress():
        gone = await _unless_disconnected(service.wait(job.id, wait), request)
    if gone:
        log.info("job %s: the client of a waiting request went away; the job goes on", job.id)
    response.status_code = 200
    return service.render(await service.get(job.id, job.owner))


async def _unless_disconnected(waiting: Awaitable[None], request: Request) -> bool:
    """Await `waiting` unless the client disconnects first; whether it did."""
    waiter, watcher = asyncio.ensure_future(waiting), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((waiter, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request's task is cancelled
        for task in (waiter, watcher):
            task.cancel()
        await asyncio.gather(waiter, watcher, return_exceptions=True)
    return watcher.done() and not watcher.cancelled()


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


def post_job(router: APIRouter, path: str, *, from_job: bool = False) -> Callable[[Route], Route]:
    """`POST path` answering 202 with the queued job (200 once it ended, with wait); `from_job` for
    routes that can take an earlier job's image (409 while that job has not succeeded)."""
    return router.post(
        path,
        status_code=202,
        response_model=schemas.Job,
        response_description="the job, queued (answered at once)",
        responses=CREATED_FROM_JOB if from_job else CREATED,
    )


@dataclass
class NewJob:
    """What a job-creating route needs besides its body: the service, the limits, the caller, how long
    to wait, and the response whose status and Location the reply sets."""

    service: JobService
    settings: Settings
    owner: str | None
    wait: float | None
    response: Response
    request: Request

    def check_images(self, field: str, count: int) -> None:
        """422 (validation_error) when a request asks for more images than DDPM_MAX_IMAGES."""
        if count > self.settings.max_images:
            raise invalid(field, f"at most {self.settings.max_images} images per request (DDPM_MAX_IMAGES)")

    async def submit(self, **job: Any) -> schemas.Job:
        """Queue the job (as `JobService.submit`, for this caller) and reply with it."""
        record = await self.service.submit(owner=self.owner, **job)
        return await reply(self.service, record, self.wait, self.response, self.request)


def _new_job(
    service: ServiceDep,
    settings: SettingsDep,
    owner: OwnerDep,
    wait: WaitDep,
    response: Response,
    request: Request,
) -> NewJob:
    return NewJob(service, settings, owner, wait, response, request)


NewJobDep = Annotated[NewJob, Depends(_new_job)]
