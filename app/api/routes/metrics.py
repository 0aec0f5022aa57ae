"""GET /metrics: Prometheus text format (every name starts with `ddpm_`)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from app.metrics import update_device_memory

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus exposition format"}},
)
async def prometheus_metrics() -> Response:
    """Request latency, queue wait, job duration, engine step time and batch sizes, slots, counters."""
    update_device_memory()
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
