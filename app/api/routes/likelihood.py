"""POST /likelihood: the variational bound in bits/dim (Table 1, Fig. 5 of Ho et al. 2020)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api import schemas
from app.api.deps import OwnerDep, ServiceDep, SettingsDep, WaitDep
from app.api.errors import invalid
from app.api.routes.common import CREATED, reply
from app.sampling import random_seed

router = APIRouter(tags=["generation"])


@router.post(
    "/likelihood",
    status_code=202,
    response_model=schemas.Job,
    response_description="the job, queued (answered at once)",
    responses=CREATED,
)
async def likelihood(
    body: schemas.LikelihoodRequest,
    service: ServiceDep,
    settings: SettingsDep,
    owner: OwnerDep,
    wait: WaitDep,
    response: Response,
) -> schemas.Job:
    """L = L_T + Σ L_{t−1} + L_0 (eq. 5) per image in bits/dim, L_0 with the discretized Gaussian decoder;
    one pass over all T timesteps. The result has `bits_per_dim` and its three `terms` (and with
    `curve: true`, Fig. 5's rate and distortion per t); the job has no images."""
    entry = service.model(body.model)
    if len(body.images) > settings.max_images:
        raise invalid("images", f"at most {settings.max_images} images per request (DDPM_MAX_IMAGES)")
    timesteps, max_steps = entry.timesteps, service.max_steps(entry)
    if timesteps > max_steps:
        raise invalid(
            "model",
            f"the bound of {entry.name} takes all T = {timesteps} steps, more than the {max_steps} "
            "this server allows (DDPM_MAX_STEPS)",
        )
    images = await service.decode_uploads({f"images.{k}": text for k, text in enumerate(body.images)}, entry)
    seed = body.seed if body.seed is not None else random_seed()
    work_params = {"seed": seed, "curve": body.curve}
    params = {"model": entry.name, "images": len(body.images), **work_params}
    job = await service.submit(
        kind="likelihood",
        model=entry.name,
        params=params,
        work_params=work_params,
        inputs={"images": images},
        seed=seed,
        steps=timesteps,
        stream_every=0,  # the bound has no x̂₀ chain worth watching
        owner=owner,
    )
    return await reply(service, job, wait, response)
