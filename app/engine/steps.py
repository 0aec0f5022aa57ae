"""A chain's step coefficients as one table on the device, and the fused per-row update the engine applies.

A chain's (t, t_prev) plan is fixed when it starts, so its coefficients are computed once, on the
device, as a (steps, 7) float32 table whose row k holds, for the chain's k-th step,

    √(1/ᾱ_t), √(1/ᾱ_t − 1), a, b, c, σ, clip

for x̂_0 = √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε (eq. 4 solved for x_0), clipped to [−1, 1] where clip = 1, and
x_prev = a·x̂_0 + b·x_t + c·ε + σ·z (app.diffusion.samplers: Algorithm 2 or DDIM eq. 12). Every step
the engine only slices each group's current row (a view: no host-to-device copy, so no host
synchronisation on CUDA) and applies `fused_update`, a handful of elementwise kernels, or one when
compiled. The arithmetic is `denoise_step`'s, in the same order, so eager results agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from app.diffusion import Schedule, Variance, ddim_coefficients, ddpm_coefficients

SQRT_RECIP, SQRT_RECIPM1, COEF_X0, COEF_XT, COEF_EPS, SIGMA, CLIP = range(7)
COLUMNS = 7

Update = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class StepTable:
    """A chain's timesteps (steps,) long and per-step coefficients (steps, COLUMNS) float32, on its device."""

    t: Tensor
    coef: Tensor


def chain_table(
    s: Schedule,
    plan_t: Sequence[int],
    plan_t_prev: Sequence[int],
    *,
    sampler: str,
    eta: float,
    variance: Variance,
    clip_denoised: bool,
    device: torch.device,
) -> StepTable:
    """The table of a DDPM (Algorithm 2) or DDIM (eq. 12) chain over its whole plan, from float64 maths."""
    t, t_prev = _indices(plan_t, device), _indices(plan_t_prev, device)
    if sampler == "ddim":
        c = ddim_coefficients(s, t, t_prev, float(eta))
    else:
        c = ddpm_coefficients(s, t, t_prev, Variance(variance))
    columns = [
        s.sqrt_recip_alphas_cumprod.to(device)[t],
        s.sqrt_recipm1_alphas_cumprod.to(device)[t],
        c.x0,
        c.xt,
        c.eps,
        c.sigma,
        torch.full_like(c.x0, 1.0 if clip_denoised else 0.0),
    ]
    return StepTable(t=t, coef=torch.stack([col.to(device) for col in columns], dim=1).float())


def _indices(values: Sequence[int], device: torch.device) -> Tensor:
    """A long tensor on `device`; to CUDA through pinned memory, so the copy does not wait for the GPU."""
    cpu = torch.tensor(list(values), dtype=torch.long)
    if device.type == "cuda":
        return cpu.pin_memory().to(device, non_blocking=True)
    return cpu.to(device)


def fused_update(xt: Tensor, eps: Tensor, noise: Tensor, coef: Tensor) -> tuple[Tensor, Tensor]:
    """(x_prev, x̂_0) for rows of x_t, ε, z with per-row coefficients `coef` (B, COLUMNS): `denoise_step`'s
    arithmetic in `denoise_step`'s order, without building the coefficients every step."""
    shape = (xt.shape[0], *([1] * (xt.ndim - 1)))
    c = coef.to(xt.dtype)

    def col(k: int) -> Tensor:
        return c[:, k].reshape(shape)

    pred_x0 = col(SQRT_RECIP) * xt - col(SQRT_RECIPM1) * eps
    pred_x0 = torch.where(col(CLIP) > 0, pred_x0.clamp(-1.0, 1.0), pred_x0)
    x_prev = col(COEF_X0) * pred_x0 + col(COEF_XT) * xt + col(COEF_EPS) * eps
    return x_prev + col(SIGMA) * noise, pred_x0


def compiled_update() -> Update:
    """`fused_update` compiled into one kernel per shape family (batch size is dynamic)."""
    return torch.compile(fused_update, dynamic=True)
