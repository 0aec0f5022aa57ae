"""POST /sample: unconditional sampling with Algorithm 2 (DDPM) or DDIM."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from app.api import schemas
from app.api.errors import invalid
from app.api.routes.common import NewJobDep, post_job
from app.api.uploads import decode_latents
from app.sampling import default_variance, random_seed

router = APIRouter(tags=["generation"])


@post_job(router, "/sample")
async def sample(
    body: schemas.SampleRequest,
    call: NewJobDep,
) -> schemas.Job:
    """Sample `n` images; image k depends only on (seed, k), whatever else the server is running."""
    entry = call.service.model(body.model)
    call.check_images("n", body.n)
    max_steps = call.service.max_steps(entry)
    steps = body.steps if body.steps is not None else max_steps
    if steps > max_steps:
        raise invalid("steps", f"must be 1..{max_steps} for model {entry.name} (T = {entry.timesteps})")
    inputs = {}
    if body.latents is not None:
        shape = (body.n, entry.ckpt.channels, entry.ckpt.resolution, entry.ckpt.resolution)
        inputs["latents"] = await asyncio.to_thread(
            decode_latents, body.latents, shape=shape, max_bytes=call.settings.max_body_bytes
        )
    seed = body.seed if body.seed is not None else random_seed()
    # The engine takes a variance for every row (DDIM ignores it); the job shows it for ddpm only.
    variance = str(default_variance(entry.ckpt)) if body.variance == "model" else body.variance
    work_params = {
        "n": body.n,
        "steps": steps,
        "sampler": body.sampler,
        "eta": body.eta,
        "variance": variance,
        "clip_denoised": body.clip_denoised,
        "seed": seed,
    }
    params = {
        **work_params,
        "variance": variance if body.sampler == "ddpm" else None,
        "model": entry.name,
        "latents": body.latents is not None,
        "output": body.output,
    }
    return await call.submit(
        kind="sample",
        model=entry.name,
        params=params,
        work_params=work_params,
        inputs=inputs,
        seed=seed,
        steps=steps,
        stream_every=body.stream_every,
    )
