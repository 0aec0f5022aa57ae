"""One router per file; `ROUTERS` is the order they appear in /docs."""

from app.api.routes import (
    health,
    interpolate,
    jobs,
    likelihood,
    metrics,
    models,
    page,
    reconstruct,
    sample,
    stream,
)

ROUTERS = (
    sample.router,
    interpolate.router,
    reconstruct.router,
    likelihood.router,
    jobs.router,
    stream.router,
    models.router,
    health.router,
    metrics.router,
    page.router,
)
