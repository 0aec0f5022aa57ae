"""The FastAPI app factory: settings in, an app whose lifespan loads the models and runs the engines.

    app = create_app(Settings(models=["models/mnist"]))

Start-up loads every model (off the event loop; uvicorn accepts no request until it is done, so a bad
model reference stops the process with its error), starts one engine thread per model and the job
runner that records what they report. Shut-down stops the engines, then flushes pending writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from PIL import Image

from app import metrics
from app.api.errors import install_error_handlers
from app.api.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from app.api.routes import ROUTERS
from app.api.service import JobService
from app.api.sse import StreamLimiter
from app.jobs import make_store
from app.jobs.runner import JobRunner
from app.settings import Settings

if TYPE_CHECKING:
    from app.nets import Checkpoint

log = logging.getLogger(__name__)

ENGINE_STOP_SECONDS = 10.0

DESCRIPTION = """\
Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel, 2020) as a service: sampling with
Algorithm 2 or DDIM, progressive x̂₀ previews over Server-Sent Events, and jobs you can poll, stream,
download and cancel. Every error is `{"error": {"code", "message"}}`.
"""


def load_models(settings: Settings) -> dict[str, Checkpoint]:
    """Load every configured model onto the settings' device, keyed by name (first = default)."""
    from app.nets import resolve_model

    device = settings.resolved_device()
    checkpoints: dict[str, Checkpoint] = {}
    for ref in settings.model_refs():
        start = time.perf_counter()
        ckpt = resolve_model(ref, device=device)
        seconds = time.perf_counter() - start
        if ckpt.name in checkpoints:
            raise ValueError(
                f"two models are named {ckpt.name!r} ({checkpoints[ckpt.name].source} and {ref})"
            )
        checkpoints[ckpt.name] = ckpt
        metrics.MODEL_LOAD_SECONDS.labels(model=ckpt.name).set(seconds)
        log.info("loaded model %s from %s on %s in %.1f s", ckpt.name, ref, device, seconds)
    return checkpoints


def create_app(
    settings: Settings | None = None, *, checkpoints: dict[str, Checkpoint] | None = None
) -> FastAPI:
    """The app; `checkpoints` (already loaded, first = default) replaces loading `settings.models`."""
    settings = settings if settings is not None else Settings()
    store = make_store(settings)  # refuses DDPM_REDIS_URL until distributed mode exists
    Image.MAX_IMAGE_PIXELS = settings.max_upload_pixels  # Pillow's bomb check, also for any later decode

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from app.engine.pool import EnginePool

        loaded = checkpoints if checkpoints is not None else await asyncio.to_thread(load_models, settings)
        runner = JobRunner(store, asyncio.get_running_loop())
        pool = EnginePool(loaded, listener=runner, max_batch=settings.max_batch)
        pool.start()
        app.state.service = JobService(settings, store, pool, runner, loaded)
        try:
            yield
        finally:
            app.state.service = None
            await asyncio.to_thread(pool.stop, ENGINE_STOP_SECONDS)
            await asyncio.to_thread(runner.close)
            await runner.drain()
            await store.close()

    app = FastAPI(title="ddpm-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.store = store
    app.state.service = None
    app.state.streams = StreamLimiter(settings.max_streams_per_key)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware)  # outermost: times everything, 413s included
    return app
