"""The FastAPI app factory: settings in, an app whose lifespan connects it to whatever runs the jobs.

    app = create_app(Settings(models=["models/mnist"]))

Embedded (no DDPM_REDIS_URL): start-up loads every model (off the event loop; uvicorn accepts no request
until it is done, so a bad model reference stops the process with its error), starts one engine thread
per model and the job runner that records what they report; shut-down stops the engines, then flushes
pending writes. Distributed: jobs, events and results live in Redis and `ddpm-worker` processes run
them; this process loads no model (app/api/redis_dispatch.py). `app.state.draining` (app/api/sse.py)
is what ends open streams when shutdown starts; `ddpm-serve` sets it before waiting for connections.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from PIL import Image

from app.api.deps import authenticate
from app.api.dispatch import Dispatcher, LocalDispatcher
from app.api.errors import install_error_handlers
from app.api.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from app.api.routes import ROUTERS
from app.api.service import JobService
from app.api.sse import Draining, StreamLimiter
from app.jobs import make_store
from app.settings import Settings

if TYPE_CHECKING:
    from app.nets import Checkpoint

DESCRIPTION = """\
Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel, 2020) as a service: sampling with
Algorithm 2 or DDIM, progressive x̂₀ previews over Server-Sent Events, and jobs you can poll, stream,
download and cancel. Every error is `{"error": {"code", "message"}}`.
"""


def create_app(
    settings: Settings | None = None, *, checkpoints: dict[str, Checkpoint] | None = None
) -> FastAPI:
    """The app; `checkpoints` (already loaded, first = default) replaces loading `settings.models`."""
    settings = settings if settings is not None else Settings()
    store = make_store(settings)
    Image.MAX_IMAGE_PIXELS = settings.max_upload_pixels  # Pillow's bomb check, also for any later decode

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dispatcher: Dispatcher
        if settings.redis_url:
            from app.api.redis_dispatch import RedisDispatcher

            dispatcher = await RedisDispatcher.open(settings, store)
        else:
            dispatcher = await LocalDispatcher.open(settings, store, checkpoints)
        app.state.service = JobService(settings, store, dispatcher)
        app.state.draining = Draining()  # a fresh one per run of the app (tests start an app repeatedly)
        try:
            yield
        finally:
            app.state.draining.set()  # ddpm-serve sets it earlier, when shutdown starts (app/serve.py)
            app.state.service = None
            await dispatcher.close()
            await store.close()

    app = FastAPI(title="ddpm-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.store = store
    app.state.service = None
    app.state.streams = StreamLimiter(settings.max_streams_per_key)
    app.state.draining = Draining()  # set when shutdown starts: open streams end with a `shutdown` event
    install_error_handlers(app, authenticate=authenticate)
    if settings.redis_url:
        from app.api.redis_dispatch import install_error_handler

        install_error_handler(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware)  # outermost: times everything, 413s included
    return app
