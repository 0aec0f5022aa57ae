"""POST /interpolate: interpolation in latent space at a chosen t (§4.3, Fig. 8–9 of Ho et al. 2020)."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter

from app.api import schemas
from app.api.errors import invalid
from app.api.routes.common import NewJobDep, default_t, post_job
from app.api.service import JobService, ModelEntry
from app.sampling import random_seed

router = APIRouter(tags=["generation"])

SIDES = ("a", "b")


def _source_params(source: schemas.Source) -> dict[str, Any]:
    # The job shows where each source came from, not the uploaded bytes.
    if isinstance(source, schemas.ImageSource):
        return {"image": True}
    return source.model_dump()


async def _source_input(
    service: JobService,
    entry: ModelEntry,
    owner: str | None,
    side: str,
    source: schemas.ImageSource | schemas.JobImageSource,
) -> np.ndarray:
    if isinstance(source, schemas.ImageSource):
        return (await service.decode_uploads({f"{side}.image": source.image}, entry))[0]
    return await service.job_image(source.job, source.index, entry, owner=owner, prefix=f"{side}.")


@post_job(router, "/interpolate", from_job=True)
async def interpolate(
    body: schemas.InterpolateRequest,
    call: NewJobDep,
) -> schemas.Job:
    """Encode a and b to x_t with one shared noise, mix x̄_t = (1−λ) x_t^a + λ x_t^b, decode every λ
    with one shared reverse noise. Images are ordered by t, then λ; the grid has a row per t and a
    column per λ. A `{"seed": s}` source is first sampled with all T steps (Algorithm 2)."""
    entry = call.service.model(body.model)
    timesteps, max_steps = entry.timesteps, call.service.max_steps(entry)  # T, DDPM_MAX_STEPS or T
    ts = (
        body.t
        if isinstance(body.t, list)
        else [body.t if body.t is not None else default_t(entry, max_steps)]
    )
    if not ts:
        raise invalid("t", "give at least one t")
    if not all(1 <= t <= timesteps for t in ts):
        raise invalid("t", f"every t must be 1..{timesteps} for model {entry.name} (T = {timesteps})")
    lambdas = body.lambdas if body.lambdas is not None else np.linspace(0.0, 1.0, body.num).tolist()
    rows = len(ts) * len(lambdas)
    if rows > call.settings.max_images:
        raise invalid(
            "lambdas" if body.lambdas is not None else "num",
            f"{len(ts)} t × {len(lambdas)} λ make {rows} images, more than the {call.settings.max_images} "
            "allowed per request (DDPM_MAX_IMAGES); give fewer t or λ",
        )
    if body.steps is not None and body.steps > min(ts):
        raise invalid("steps", f"must be 1..{min(ts)}: the reverse process from t has at most t steps")
    decode_steps = body.steps or max(ts)
    if decode_steps > max_steps:
        raise invalid(
            "steps" if body.steps is not None else "t",
            f"decoding takes {decode_steps} steps, more than the {max_steps} allowed (DDPM_MAX_STEPS); "
            "give fewer steps",
        )
    sources = dict(zip(SIDES, (body.a, body.b), strict=True))
    for side, source in sources.items():
        if not isinstance(source, schemas.JobImageSource) and "index" in source.model_fields_set:
            kind = "image" if isinstance(source, schemas.ImageSource) else "seed"
            raise invalid(f"{side}.index", f"{schemas.STRAY_INDEX}; leave it out of a {kind} source")
    seeded = [side for side, source in sources.items() if isinstance(source, schemas.SeedSource)]
    if seeded and timesteps > max_steps:
        raise invalid(
            f"{seeded[0]}.seed",
            f"a seed source is sampled with all T = {timesteps} steps, more than the {max_steps} allowed "
            "(DDPM_MAX_STEPS); upload the image or name a job's image instead",
        )
    inputs = {
        side: await _source_input(call.service, entry, call.owner, side, source)
        for side, source in sources.items()
        if side not in seeded
    }
    seed = body.seed if body.seed is not None else random_seed()
    work_params: dict[str, Any] = {"t": ts, "lambdas": lambdas, "steps": body.steps, "seed": seed}
    work_params.update({f"{side}_seed": sources[side].seed for side in seeded})
    params = {
        "model": entry.name,
        **{side: _source_params(source) for side, source in sources.items()},
        "t": ts,
        "lambdas": lambdas,
        "num": body.num,
        "steps": body.steps,
        "seed": seed,
        "output": body.output,
    }
    return await call.submit(
        kind="interpolate",
        model=entry.name,
        params=params,
        work_params=work_params,
        inputs=inputs,
        seed=seed,
        steps=(timesteps if seeded else 0)
        + decode_steps,  # as the engine counts: sources first, then decoding
        stream_every=body.stream_every,
    )
