"""GET/DELETE /jobs/{id} and the downloads of a finished job's images."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api import schemas
from app.api.deps import OwnerDep, ServiceDep
from app.api.routes.common import errors
from app.jobs.encoding import GRID, npy_name, png_name

router = APIRouter(prefix="/jobs", tags=["jobs"])

_PNG = {200: {"content": {"image/png": {}}, "description": "an 8-bit PNG"}}
_NPY = {
    200: {"content": {"application/octet-stream": {}}, "description": "a float32 .npy, values in [-1, 1]"}
}
# 404: unknown job (code not_found), a likelihood job, which makes no images (no_images), or an image
# index the job does not have (no_such_image); 409: the job has not succeeded (yet).
_DOWNLOAD_ERRORS = errors(401, 404, 409, 422)


def _download(data: bytes, media_type: str, filename: str) -> Response:
    # Results never change once written, so clients and proxies may keep them for the job's lifetime.
    headers = {
        "Content-Disposition": f'inline; filename="{filename}"',
        "Cache-Control": "private, max-age=3600",
    }
    return Response(content=data, media_type=media_type, headers=headers)


@router.get("/{job_id}", response_model=schemas.Job, responses=errors(401, 404, 422))
async def get_job(job_id: str, service: ServiceDep, owner: OwnerDep) -> schemas.Job:
    """The job, with its queue position while queued and its result links once it succeeded."""
    return service.render(await service.get(job_id, owner))


@router.delete("/{job_id}", response_model=schemas.Job, responses=errors(401, 404, 422))
async def cancel_job(job_id: str, service: ServiceDep, owner: OwnerDep) -> schemas.Job:
    """Cancel: a queued job never starts, a running one stops within one denoising step.

    Answers with the job once it has ended: `cancelled`, or its final status if it ended first.
    """
    job = await service.get(job_id, owner)
    return service.render(await service.cancel(job))


@router.get("/{job_id}/images/{index}.png", response_class=Response, responses={**_PNG, **_DOWNLOAD_ERRORS})
async def image_png(job_id: str, index: int, service: ServiceDep, owner: OwnerDep) -> Response:
    """Image `index` (0-based) as PNG; 409 until the job has succeeded, 404 for a likelihood job
    (no images)."""
    job = await service.get(job_id, owner)
    data = await service.result(job, png_name(index), index=index)
    return _download(data, "image/png", f"{job_id}-{index}.png")


@router.get("/{job_id}/images/{index}.npy", response_class=Response, responses={**_NPY, **_DOWNLOAD_ERRORS})
async def image_npy(job_id: str, index: int, service: ServiceDep, owner: OwnerDep) -> Response:
    """Image `index` (0-based) as float32 .npy of shape (1, C, H, W); 409 until the job has succeeded,
    404 for a likelihood job (no images)."""
    job = await service.get(job_id, owner)
    data = await service.result(job, npy_name(index), index=index)
    return _download(data, "application/octet-stream", f"{job_id}-{index}.npy")


@router.get("/{job_id}/images.npy", response_class=Response, responses={**_NPY, **_DOWNLOAD_ERRORS})
async def images_npy(job_id: str, service: ServiceDep, owner: OwnerDep) -> Response:
    """Every image as one float32 .npy of shape (n, C, H, W); 409 until the job has succeeded, 404 for a
    likelihood job (no images)."""
    job = await service.get(job_id, owner)
    return _download(await service.images_npy(job), "application/octet-stream", f"{job_id}.npy")


@router.get("/{job_id}/grid.png", response_class=Response, responses={**_PNG, **_DOWNLOAD_ERRORS})
async def grid_png(job_id: str, service: ServiceDep, owner: OwnerDep) -> Response:
    """All images tiled into one PNG; 409 until the job has succeeded, 404 for a likelihood job
    (no images)."""
    job = await service.get(job_id, owner)
    return _download(await service.result(job, GRID), "image/png", f"{job_id}-grid.png")
