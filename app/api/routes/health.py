"""GET /healthz (the process answers) and GET /readyz (it can serve: engines run, or Redis and workers)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from app.api import schemas
from app.api.errors import ApiError
from app.api.routes.common import errors

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=schemas.Health)
async def healthz() -> schemas.Health:
    """200 while the process is up (a liveness probe: no dependency is checked)."""
    return schemas.Health()


@router.get("/readyz", response_model=schemas.Ready, responses=errors(503))
async def readyz(
    request: Request,
    workers: bool = Query(
        True,
        description="false: whether this replica can serve, whatever the workers (distributed: Redis "
        "answers); a replica's readiness probe, so that workers all down do not take every replica out of "
        "its load balancer, where status, results and streams still answer and new jobs wait in the queue",
    ),
) -> schemas.Ready:
    """200 when a model is loaded and its engines run (embedded), or when Redis answers and a worker has a
    live heartbeat (distributed; without the workers with `?workers=false`); 503 saying which is not."""
    service = request.app.state.service
    if service is None:
        raise ApiError(503, "not_ready", "no model is loaded yet")
    reason = await service.dispatcher.unready(workers=workers)
    if reason is not None:
        raise ApiError(503, "not_ready", reason)
    return schemas.Ready(models=list(service.models))
