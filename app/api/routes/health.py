"""GET /healthz (the process answers) and GET /readyz (it can serve: models loaded, engines running)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api import schemas
from app.api.errors import ApiError
from app.api.routes.common import errors

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=schemas.Health)
async def healthz() -> schemas.Health:
    """200 while the process is up (a liveness probe: no dependency is checked)."""
    return schemas.Health()


@router.get("/readyz", response_model=schemas.Ready, responses=errors(503))
async def readyz(request: Request) -> schemas.Ready:
    """200 when a model is loaded and every engine thread is alive; 503 saying which is not."""
    service = request.app.state.service
    if service is None:
        raise ApiError(503, "not_ready", "no model is loaded yet")
    dead = [name for name, engine in service.pool.engines.items() if not engine.alive]
    if dead:
        raise ApiError(503, "not_ready", f"engine not running for model(s): {', '.join(dead)}")
    return schemas.Ready(models=list(service.models))
