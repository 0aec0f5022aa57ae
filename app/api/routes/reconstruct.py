"""POST /reconstruct: stochastic reconstructions sharing one x_t (Fig. 7 of Ho et al. 2020)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api import schemas
from app.api.deps import OwnerDep, ServiceDep, SettingsDep, WaitDep
from app.api.errors import invalid
from app.api.routes.common import CREATED_FROM_JOB, default_t, reply
from app.sampling import random_seed

router = APIRouter(tags=["generation"])


@router.post(
    "/reconstruct",
    status_code=202,
    response_model=schemas.Job,
    response_description="the job, queued (answered at once)",
    responses=CREATED_FROM_JOB,
)
async def reconstruct(
    body: schemas.ReconstructRequest,
    service: ServiceDep,
    settings: SettingsDep,
    owner: OwnerDep,
    wait: WaitDep,
    response: Response,
) -> schemas.Job:
    """Diffuse the image once to x_t ~ q(x_t | x₀), then run `n` independent reverse processes from that
    one x_t (t steps each): what survives to every reconstruction is what x_t still knew of x₀."""
    entry = service.model(body.model)
    if body.n > settings.max_images:
        raise invalid("n", f"at most {settings.max_images} images per request (DDPM_MAX_IMAGES)")
    t = body.t if body.t is not None else default_t(entry)
    if t > entry.timesteps:
        raise invalid("t", f"must be 1..{entry.timesteps} for model {entry.name} (T = {entry.timesteps})")
    max_steps = service.max_steps(entry)
    if t > max_steps:
        raise invalid("t", f"each reconstruction takes t steps; at most {max_steps} allowed (DDPM_MAX_STEPS)")
    if body.image is not None:
        image = (await service.decode_uploads({"image": body.image}, entry))[0]
        source: dict[str, object] = {"image": True}
    else:
        assert body.job is not None  # the request model requires one of the two
        image = await service.job_image(body.job, body.index, entry, owner=owner)
        source = {"job": body.job, "index": body.index}
    seed = body.seed if body.seed is not None else random_seed()
    work_params = {"t": t, "n": body.n, "seed": seed}
    params = {"model": entry.name, **source, **work_params, "output": body.output}
    job = await service.submit(
        kind="reconstruct",
        model=entry.name,
        params=params,
        work_params=work_params,
        inputs={"image": image},
        seed=seed,
        steps=t,
        stream_every=body.stream_every,
        owner=owner,
    )
    return await reply(service, job, wait, response)
