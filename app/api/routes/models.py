"""GET /models: what is loaded and how each model was trained."""

from __future__ import annotations

from fastapi import APIRouter

from app.api import schemas
from app.api.deps import OwnerDep, ServiceDep
from app.api.routes.common import errors
from app.nets import SchedulerConfig
from app.sampling import default_variance

router = APIRouter(tags=["models"])


def schedule_name(scheduler: SchedulerConfig) -> str:
    """The β schedule as people call it: "cosine" (Nichol & Dhariwal), not diffusers' "squaredcos_cap_v2",
    which the checkpoint's config spells; "trained" when the config lists the betas."""
    if scheduler.trained_betas is not None:
        return "trained"
    return "cosine" if scheduler.beta_schedule == "squaredcos_cap_v2" else scheduler.beta_schedule


@router.get("/models", response_model=list[schemas.ModelInfo], responses=errors(401, 422, 503))
async def list_models(service: ServiceDep, _: OwnerDep) -> list[schemas.ModelInfo]:
    """The loaded models, the default first."""
    entries = sorted(service.models.values(), key=lambda e: not e.default)
    return [
        schemas.ModelInfo(
            name=e.name,
            default=e.default,
            resolution=e.ckpt.resolution,
            channels=e.ckpt.channels,
            timesteps=e.timesteps,
            max_steps=service.max_steps(e),
            beta_schedule=schedule_name(e.ckpt.scheduler),
            variance=str(default_variance(e.ckpt)),
            parameters=e.ckpt.num_parameters,
            source=e.ckpt.source,
        )
        for e in entries
    ]
