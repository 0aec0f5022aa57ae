"""POST /reconstruct: stochastic reconstructions sharing one x_t (Fig. 7 of Ho et al. 2020)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api import schemas
from app.api.errors import invalid
from app.api.routes.common import NewJobDep, default_t, post_job
from app.sampling import random_seed

router = APIRouter(tags=["generation"])


@post_job(router, "/reconstruct", from_job=True)
async def reconstruct(
    body: schemas.ReconstructRequest,
    call: NewJobDep,
) -> schemas.Job:
    """Diffuse the image once to x_t ~ q(x_t | x₀), then run `n` independent reverse processes from that
    one x_t (t steps each): what survives to every reconstruction is what x_t still knew of x₀."""
    entry = call.service.model(body.model)
    call.check_images("n", body.n)
    max_steps = call.service.max_steps(entry)
    t = body.t if body.t is not None else default_t(entry, max_steps)
    if t > entry.timesteps:
        raise invalid("t", f"must be 1..{entry.timesteps} for model {entry.name} (T = {entry.timesteps})")
    if t > max_steps:
        raise invalid("t", f"each reconstruction takes t steps; at most {max_steps} allowed (DDPM_MAX_STEPS)")
    if body.image is not None and "index" in body.model_fields_set:
        raise invalid("index", f"{schemas.STRAY_INDEX}; leave it out when sending an image")
    if body.image is not None:
        image = (await call.service.decode_uploads({"image": body.image}, entry))[0]
        source: dict[str, object] = {"image": True}
    else:
        assert body.job is not None  # the request model requires one of the two
        image = await call.service.job_image(body.job, body.index, entry, owner=call.owner)
        source = {"job": body.job, "index": body.index}
    seed = body.seed if body.seed is not None else random_seed()
    work_params = {"t": t, "n": body.n, "seed": seed}
    params = {"model": entry.name, **source, **work_params, "output": body.output}
    return await call.submit(
        kind="reconstruct",
        model=entry.name,
        params=params,
        work_params=work_params,
        inputs={"image": image},
        seed=seed,
        steps=t,
        stream_every=body.stream_every,
    )
