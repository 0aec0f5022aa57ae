"""Pieces shared by the job-creating routes: documented error answers and the 202/200 reply."""

from __future__ import annotations

from typing import Any

from fastapi import Response

from app.api import schemas
from app.api.service import JobService, ModelEntry
from app.jobs import JobRecord


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries with the error shape, for the given statuses."""
    return {status: {"model": schemas.ErrorResponse} for status in statuses}


CREATED = {
    200: {"model": schemas.Job, "description": "the job, after it ended (with ?wait=true or Prefer: wait=N)"},
    **errors(400, 401, 404, 413, 422, 429, 503),
}

# Routes that can take an image of an earlier job: 409 while that job has not succeeded.
CREATED_FROM_JOB = {**CREATED, **errors(409)}


def default_t(entry: ModelEntry) -> int:
    """The t of interpolation and reconstruction when none is given: halfway, the paper's t = 500 of 1000."""
    return max(1, entry.timesteps // 2)


async def reply(service: JobService, job: JobRecord, wait: float | None, response: Response) -> schemas.Job:
    """202 with the queued job at once, or 200 with the job once it ended (or `wait` seconds passed)."""
    if wait is None:
        response.headers["Location"] = f"/jobs/{job.id}"
        return service.render(job)
    await service.wait(job.id, wait)
    response.status_code = 200
    return service.render(await service.get(job.id, job.owner))
