"""A Python client for ddpm-serve (docs/API.md), synchronous and asynchronous, on httpx.

    from app.client import Client, Progress

    with Client("http://127.0.0.1:8000") as ddpm:  # API key: api_key=… or $DDPM_API_KEY
        job = ddpm.sample(n=4, steps=100, sampler="ddim", seed=1, stream_every=10)
        for event in ddpm.stream(job):  # x̂₀ previews, then the final job
            if isinstance(event, Progress):
                print(f"step {event.step}/{event.steps}, t = {event.t}", len(event.x0))  # 0: no images
            else:
                job = event
        images = ddpm.images(job)  # float32 (4, C, H, W) in [-1, 1]
        row = ddpm.interpolate((job, 0), (job, 1), t=500, num=8, wait=True)
        ddpm.grid(row).save("row.png")

    async with AsyncClient("http://127.0.0.1:8000") as ddpm:  # the same methods, awaited
        job = await ddpm.sample(n=4, steps=50, wait=True)
        async for event in ddpm.stream(job): ...

Every failure is a `DDPMError(status, code, message)` carrying the API's JSON error (status 0 when the
server could not be reached; `redirect` for a 3xx, naming where to; `bad_response` for an answer that is
not the API's). A 429 (queue full) or 503 (not ready) is retried with exponential backoff, waiting the
`Retry-After` the server sends when it sends one; a stream that breaks or cannot reconnect is opened
again, resuming after the last event, until `retries` connections in a row have delivered nothing.

Each operation is written once, as a generator that yields the HTTP calls it needs and receives their
responses (`Flow`); `Client` and `AsyncClient` only differ in how they perform a call and sleep.
"""

from app.client.bodies import ImageLike, JobImage, Source
from app.client.clients import AsyncClient, Client
from app.client.results import DDPMError, Job, Likelihood, Model, Progress

__all__ = [
    "AsyncClient",
    "Client",
    "DDPMError",
    "ImageLike",
    "Job",
    "JobImage",
    "Likelihood",
    "Model",
    "Progress",
    "Source",
]
