"""POST /likelihood: the variational bound in bits/dim (Table 1, Fig. 5 of Ho et al. 2020)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api import schemas
from app.api.errors import invalid
from app.api.routes.common import NewJobDep, post_job
from app.sampling import random_seed

router = APIRouter(tags=["generation"])


@post_job(router, "/likelihood")
async def likelihood(
    body: schemas.LikelihoodRequest,
    call: NewJobDep,
) -> schemas.Job:
    """L = L_T + Σ L_{t−1} + L_0 (eq. 5) per image in bits/dim, L_0 with the discretized Gaussian decoder;
    one pass over all T timesteps. The result has `bits_per_dim` and its three `terms` (and with
    `curve: true`, Fig. 5's rate and distortion per t); the job has no images."""
    entry = call.service.model(body.model)
    call.check_images("images", len(body.images))
    timesteps, max_steps = entry.timesteps, call.service.max_steps(entry)
    if timesteps > max_steps:
        raise invalid(
            "model",
            f"the bound of {entry.name} takes all T = {timesteps} steps, more than the {max_steps} "
            "this server allows (DDPM_MAX_STEPS)",
        )
    uploads = {f"images.{k}": text for k, text in enumerate(body.images)}
    images = await call.service.decode_uploads(uploads, entry)
    seed = body.seed if body.seed is not None else random_seed()
    work_params = {"seed": seed, "curve": body.curve}
    params = {"model": entry.name, "images": len(body.images), **work_params}
    return await call.submit(
        kind="likelihood",
        model=entry.name,
        params=params,
        work_params=work_params,
        inputs={"images": images},
        seed=seed,
        steps=timesteps,
        stream_every=0,  # the bound has no x̂₀ chain worth watching
    )
