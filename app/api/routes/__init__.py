"""One router per file; `ROUTERS` is the order they appear in /docs."""

from app.api.routes import health, jobs, metrics, models, sample, stream

ROUTERS = (sample.router, jobs.router, stream.router, models.router, health.router, metrics.router)
