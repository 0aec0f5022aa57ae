"""Job programs: each kind of work as a generator that yields groups to run and receives their results.

    final = yield [group, ...]     # the engine runs the groups (batched with everything else)
                                   # and sends back the list of their results, in order
    return images, extra           # (n, C, H, W) CPU tensor (may be empty) and JSON extras

Sampling is one phase; interpolation from seeds first samples its sources, then decodes; the
likelihood evaluates the bound. Timestep indices are 0-based (the paper's t minus one).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from app.diffusion import Schedule, Variance, ddim_plan, ddpm_plan, q_sample
from app.engine.groups import BoundGroup, ChainGroup, Group
from app.engine.work import Work
from app.nets import Checkpoint
from app.rng import ImageNoise

Program = Generator[list[Group], list[Tensor], tuple[Tensor, dict[str, Any]]]

ENCODE_STREAM = -1  # the stream that encodes x_0 into x_t, shared by every row of a job
DECODE_STREAM = 0  # interpolation: every λ decodes with the noise of reconstruction 0


@dataclass(frozen=True)
class Context:
    """What programs need to know about the model they run on."""

    ckpt: Checkpoint
    schedule: Schedule  # on `device`
    device: torch.device

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.ckpt.channels, self.ckpt.resolution, self.ckpt.resolution)

    @property
    def num_timesteps(self) -> int:
        return self.ckpt.scheduler.num_train_timesteps

    @property
    def variance(self) -> Variance:
        return Variance.from_diffusers(self.ckpt.scheduler.variance_type)

    def tensor(self, a: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float32), device=self.device)


def chain(
    ctx: Context,
    job_id: str,
    x: Tensor,
    noise: ImageNoise,
    *,
    t_start: int,
    steps: int,
    sampler: str = "ddpm",
    eta: float = 0.0,
    variance: Variance | None = None,
    clip_denoised: bool = True,
) -> ChainGroup:
    """A reverse chain from x at index t_start, `steps` trailing steps down to x_0."""
    plan = (ddim_plan if sampler == "ddim" else ddpm_plan)(t_start + 1, steps)
    return ChainGroup(
        job_id=job_id,
        plan_t=plan[0].tolist(),
        plan_t_prev=plan[1].tolist(),
        noise=noise,
        x=x,
        sampler=sampler,
        eta=eta,
        variance=variance or ctx.variance,
        clip_denoised=clip_denoised,
    )


def total_steps(ctx: Context, work: Work) -> int:
    """Progress denominator: the engine iterations the job takes when it runs without waiting."""
    p, T = work.params, ctx.num_timesteps
    if work.kind == "sample":
        return p["steps"]
    if work.kind == "reconstruct":
        return p["t"]
    if work.kind == "likelihood":
        return T
    seeded = any(f"{side}_seed" in p for side in "ab")
    return (T if seeded else 0) + max(p["steps"] or t for t in p["t"])


def sample(ctx: Context, work: Work) -> Program:
    """Unconditional samples, Algorithm 2 or DDIM; image k draws from stream (seed, k)."""
    p = work.params
    noise = ImageNoise(p["seed"], range(p["n"]), ctx.shape, ctx.device)
    x_T = ctx.tensor(work.inputs["latents"]) if "latents" in work.inputs else noise.randn()
    group = chain(
        ctx,
        work.job_id,
        x_T,
        noise,
        t_start=ctx.num_timesteps - 1,
        steps=p["steps"],
        sampler=p["sampler"],
        eta=p["eta"],
        variance=Variance(p["variance"]),
        clip_denoised=p["clip_denoised"],
    )
    (images,) = yield [group]
    return images, {}


def reconstruct(ctx: Context, work: Work) -> Program:
    """Fig. 7: one x_t ~ q(x_t | x_0), then n independent reverse chains from it, all t steps."""
    p = work.params
    t = p["t"] - 1
    x0 = ctx.tensor(work.inputs["image"])[None]
    shared = ImageNoise(p["seed"], [ENCODE_STREAM], ctx.shape, ctx.device)
    xt = q_sample(ctx.schedule, x0, torch.tensor([t], device=ctx.device), shared.randn())
    noise = ImageNoise(p["seed"], range(p["n"]), ctx.shape, ctx.device)
    (images,) = yield [
        chain(ctx, work.job_id, xt.expand(p["n"], -1, -1, -1).clone(), noise, t_start=t, steps=p["t"])
    ]
    return images, {}


def interpolate(ctx: Context, work: Work) -> Program:
    """§4.3, Fig. 8–9: encode both sources with one noise, mix x_t linearly, decode with one noise."""
    p = work.params
    sources = {side: ctx.tensor(work.inputs[side]) for side in "ab" if side in work.inputs}
    seeded = [side for side in "ab" if side not in sources]
    if seeded:
        groups = []
        for side in seeded:
            seed = p[f"{side}_seed"]
            noise = ImageNoise(seed, [0], ctx.shape, ctx.device)
            groups.append(
                chain(
                    ctx,
                    work.job_id,
                    noise.randn(),
                    noise,
                    t_start=ctx.num_timesteps - 1,
                    steps=ctx.num_timesteps,
                )
            )
        results = yield groups
        sources.update({side: x[0].to(ctx.device) for side, x in zip(seeded, results, strict=True)})
    x0 = torch.stack([sources["a"], sources["b"]])
    lambdas = torch.tensor(p["lambdas"], dtype=torch.float32, device=ctx.device)[:, None, None, None]
    groups = []
    for t_paper in p["t"]:
        t = t_paper - 1
        eps = ImageNoise(p["seed"], [ENCODE_STREAM], ctx.shape, ctx.device).randn().expand(2, -1, -1, -1)
        xt = q_sample(ctx.schedule, x0, torch.full((2,), t, device=ctx.device), eps)
        mixed = (1 - lambdas) * xt[0] + lambdas * xt[1]
        noise = ImageNoise(p["seed"], [DECODE_STREAM] * len(p["lambdas"]), ctx.shape, ctx.device)
        groups.append(chain(ctx, work.job_id, mixed, noise, t_start=t, steps=p["steps"] or t_paper))
    results = yield groups
    return torch.cat(results), {"rows": len(p["t"]), "columns": len(p["lambdas"])}


def likelihood(ctx: Context, work: Work) -> Program:
    """The variational bound L = L_T + Σ L_{t−1} + L_0 in bits/dim (eq. 5), per image."""
    p = work.params
    x0 = ctx.tensor(work.inputs["images"])
    noise = ImageNoise(p["seed"], range(len(x0)), ctx.shape, ctx.device)
    group = BoundGroup(
        job_id=work.job_id,
        plan_t=list(range(ctx.num_timesteps - 1, -1, -1)),
        plan_t_prev=list(range(ctx.num_timesteps - 2, -2, -1)),
        noise=noise,
        x0=x0,
        variance=ctx.variance,
    )
    (bound,) = yield [group]
    prior, terms = bound[:, 0], bound[:, 1:]
    extra: dict[str, Any] = {
        "bits_per_dim": (prior + terms.sum(1)).tolist(),
        "terms": {
            "prior": prior.tolist(),
            "diffusion": terms[:, 1:].sum(1).tolist(),
            "decoder": terms[:, 0].tolist(),
        },
    }
    if p.get("curve"):
        # Fig. 5: rate at t = the bits received by the time x_t is: L_T + L_{T−1} + … + L_t (terms[:, k]
        # is L_k, L_0 the decoder's), so at t = 1 it is Table 2's rate, the bound without L_0;
        # distortion = RMSE of x̂₀(x_t) on the 0–255 scale.
        rate = prior[:, None] + terms.flip(1).cumsum(1).flip(1) - terms
        mse = group.mse.cpu()
        extra["curve"] = {
            "t": list(range(1, ctx.num_timesteps + 1)),
            "rate": rate.tolist(),
            "distortion": (mse.sqrt() * 127.5).tolist(),
        }
    return torch.empty(0), extra


PROGRAMS = {
    "sample": sample,
    "reconstruct": reconstruct,
    "interpolate": interpolate,
    "likelihood": likelihood,
}
