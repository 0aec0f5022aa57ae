"""Reverse-process samplers written as per-row affine steps, so one batch can mix requests.

Every step, for every row independently, is

    x̂_0    = clip?( √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε )
    x_prev = a·x̂_0 + b·x_t + c·ε + σ·z

with per-row (t, t_prev) and per-row coefficients (a, b, c, σ) = `StepCoefficients`. DDPM and DDIM
only differ in the coefficients, so rows of different rules, timesteps, η, variance and clipping
can share one model call and one `denoise_step`. t_prev = −1 means the step lands on x_0 (ᾱ_{−1} = 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from app.diffusion.gaussian import predict_x0_from_eps
from app.diffusion.schedule import Schedule, Variance, alpha_bar

Model = Callable[[Tensor, Tensor], Tensor]
"""ε_θ(x_t, t) with t a (B,) long tensor."""
NoiseFn = Callable[[int], Tensor]
"""noise_fn(i) -> z for step i, shaped like x."""
Callback = Callable[[int, Tensor, Tensor, Tensor], None]
"""callback(i, t, x_t, pred_x0) after step i, with the step's input x_t and its x̂_0."""


def timesteps(num_timesteps: int, steps: int) -> Tensor:
    """The `steps` timesteps visited by the reverse chain, descending, with diffusers' "trailing" spacing.

    Trailing spacing is `round(arange(T, 0, −T/S)) − 1`: it always starts at t = T−1, the noisiest step,
    like the paper's full chain, and steps down to about T/S − 1. The "leading" spacing
    (`arange(0, S)·(T//S)`, reversed) never visits t = T−1, so it starts from an x_T that the model was
    trained to see at a less noisy t; see Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Table 2. With steps == T both give T−1, …, 0.

    The float arithmetic copies numpy's arange (start + i·((start + step) − start)) so the result is the
    same as diffusers' `set_timesteps` entry for entry. For some S (e.g. T = 1000, S = 61) float rounding
    makes numpy's arange one element longer and diffusers then ends with a spurious timestep −1; this
    function returns exactly `steps` timesteps, i.e. diffusers' list without that last entry.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and the model's {num_timesteps} timesteps, got {steps}")
    start, step = float(num_timesteps), -num_timesteps / steps
    delta = (start + step) - start
    values = [start, start + step] + [start + i * delta for i in range(2, steps)]
    return torch.tensor([round(v) - 1 for v in values[:steps]], dtype=torch.long)


def ddpm_plan(num_timesteps: int, steps: int) -> tuple[Tensor, Tensor]:
    """Per-step (t, t_prev) for ancestral sampling: t_prev is the next visited timestep, −1 after the last.

    This is diffusers' `DDPMScheduler.previous_timestep` once `set_timesteps(steps)` has been called.
    """
    t = timesteps(num_timesteps, steps)
    return t, torch.cat([t[1:], t.new_full((1,), -1)])


def ddim_plan(num_timesteps: int, steps: int) -> tuple[Tensor, Tensor]:
    """Per-step (t, t_prev) for DDIM: t_prev = t − T // S, clamped at −1.

    This is the rule of diffusers' `DDIMScheduler.step` and of the DDIM authors' code. When S divides T it
    is the next visited timestep (and −1 after the last). When it does not, t_prev is generally not the
    next visited timestep (e.g. T = 1000, S = 600: 999 → 998, then the next step starts from 997), and the
    last step may end at t_prev = 0 instead of −1; we keep diffusers' rule so outputs match it.
    """
    t = timesteps(num_timesteps, steps)
    return t, (t - num_timesteps // steps).clamp(min=-1)


@dataclass(frozen=True)
class StepCoefficients:
    """Per-row (B,) coefficients of x_prev = x0·x̂_0 + xt·x_t + eps·ε + sigma·z."""

    x0: Tensor
    xt: Tensor
    eps: Tensor
    sigma: Tensor

    @staticmethod
    def cat(parts: Sequence[StepCoefficients]) -> StepCoefficients:
        """Stack the rows of several groups, in order (one group per request or per rule)."""
        return StepCoefficients(
            x0=torch.cat([p.x0 for p in parts]),
            xt=torch.cat([p.xt for p in parts]),
            eps=torch.cat([p.eps for p in parts]),
            sigma=torch.cat([p.sigma for p in parts]),
        )

    @staticmethod
    def where(mask: Tensor, a: StepCoefficients, b: StepCoefficients) -> StepCoefficients:
        """Row i from `a` where mask[i], else from `b`."""
        return StepCoefficients(
            x0=torch.where(mask, a.x0, b.x0),
            xt=torch.where(mask, a.xt, b.xt),
            eps=torch.where(mask, a.eps, b.eps),
            sigma=torch.where(mask, a.sigma, b.sigma),
        )


def ddpm_coefficients(s: Schedule, t: Tensor, t_prev: Tensor, variance: Variance) -> StepCoefficients:
    """Ancestral step t → t_prev (Ho et al. 2020, Algorithm 2, lines 3–4, on a respaced chain, eq. 6–7).

    The respaced chain has β'_t = 1 − ᾱ_t/ᾱ_prev (improved-diffusion respace, diffusers DDPMScheduler),
    so with t_prev = t − 1 this is exactly the posterior mean μ̃_t and σ² = β_t or β̃_t. No noise is added
    on the step to x_0 (t_prev = −1, Algorithm 2 line 3). diffusers instead adds noise whenever t > 0,
    which with trailing steps (last t > 0) and "fixed_large" adds √β'·z on its final step.
    """
    alpha_bar_t = alpha_bar(s, t)
    alpha_bar_prev = alpha_bar(s, t_prev)
    beta = 1.0 - alpha_bar_t / alpha_bar_prev
    # μ̃ = √ᾱ_prev β'/(1−ᾱ_t) x̂_0 + √(1−β') (1−ᾱ_prev)/(1−ᾱ_t) x_t   (eq. 7)
    coef_x0 = alpha_bar_prev.sqrt() * beta / (1.0 - alpha_bar_t)
    coef_xt = (1.0 - beta).sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
    if Variance(variance) is Variance.BETA:
        sigma2 = beta
    else:
        # β̃ = (1−ᾱ_prev)/(1−ᾱ_t) β' (eq. 7); the clamp is diffusers' (it takes a log of it elsewhere).
        sigma2 = ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta).clamp(min=1e-20)
    sigma = torch.where(t_prev >= 0, sigma2.sqrt(), 0.0)
    return StepCoefficients(x0=coef_x0, xt=coef_xt, eps=torch.zeros_like(coef_x0), sigma=sigma)


def ddim_coefficients(s: Schedule, t: Tensor, t_prev: Tensor, eta: float | Tensor) -> StepCoefficients:
    """Generalised DDIM step t → t_prev (Song et al. 2021, eq. 12 with σ_t(η) of eq. 16).

    x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε + σ z, σ = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev),
    with ᾱ_{−1} = 1 (diffusers `set_alpha_to_one=True`). ε is the model's own prediction, not
    re-derived from the clipped x̂_0 (diffusers' default `use_clipped_model_output=False`), so with
    clipping on, x̂_0 is clipped but the direction term still uses the raw ε. η = 0 is deterministic;
    η = 1 with clipping off equals the DDPM step with σ² = β̃. η may be a (B,) tensor.
    """
    alpha_bar_t = alpha_bar(s, t)
    alpha_bar_prev = alpha_bar(s, t_prev)
    if isinstance(eta, Tensor):
        eta = eta.to(device=alpha_bar_t.device, dtype=alpha_bar_t.dtype)
    sigma = (
        eta
        * ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)).sqrt()
        * (1.0 - alpha_bar_t / alpha_bar_prev).sqrt()
    )
    # 1 − ᾱ_prev − σ² ≥ 0 for η ≤ 1; the clamp only absorbs rounding at ᾱ_prev = 1.
    coef_eps = (1.0 - alpha_bar_prev - sigma**2).clamp(min=0.0).sqrt()
    return StepCoefficients(
        x0=alpha_bar_prev.sqrt(),
        xt=torch.zeros_like(alpha_bar_t),
        eps=coef_eps,
        sigma=sigma,
    )


def denoise_step(
    s: Schedule,
    xt: Tensor,
    eps: Tensor,
    t: Tensor,
    coefs: StepCoefficients,
    noise: Tensor | None,
    *,
    clip_denoised: bool | Tensor,
) -> tuple[Tensor, Tensor]:
    """One reverse step for a batch of rows: (x_prev, x̂_0). `noise` may be None when every σ is 0.

    `clip_denoised` may be a (B,) bool tensor to clip x̂_0 to [−1, 1] in some rows only.
    """
    shape = (xt.shape[0], *([1] * (xt.ndim - 1)))

    def per_row(v: Tensor) -> Tensor:
        return v.to(device=xt.device, dtype=xt.dtype).reshape(shape)

    pred_x0 = predict_x0_from_eps(s, xt, t, eps)
    if isinstance(clip_denoised, Tensor):
        clip_rows = clip_denoised.to(device=xt.device, dtype=torch.bool).reshape(shape)
        pred_x0 = torch.where(clip_rows, pred_x0.clamp(-1.0, 1.0), pred_x0)
    elif clip_denoised:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    x_prev = per_row(coefs.x0) * pred_x0 + per_row(coefs.xt) * xt + per_row(coefs.eps) * eps
    if noise is not None:
        x_prev = x_prev + per_row(coefs.sigma) * noise
    return x_prev, pred_x0


def _sample_loop(
    model: Model,
    x: Tensor,
    s: Schedule,
    plan: tuple[Tensor, Tensor],
    coefficients: Callable[[Tensor, Tensor], StepCoefficients],
    clip_denoised: bool,
    noise_fn: NoiseFn | None,
    callback: Callback | None,
) -> Tensor:
    batch = x.shape[0]
    for i, (t, t_prev) in enumerate(zip(plan[0].tolist(), plan[1].tolist(), strict=True)):
        t_row = torch.full((batch,), t, dtype=torch.long, device=x.device)
        t_prev_row = torch.full((batch,), t_prev, dtype=torch.long, device=x.device)
        eps = model(x, t_row)
        noise = noise_fn(i) if noise_fn is not None else None
        x_prev, pred_x0 = denoise_step(
            s, x, eps, t_row, coefficients(t_row, t_prev_row), noise, clip_denoised=clip_denoised
        )
        if callback is not None:
            callback(i, t_row, x, pred_x0)
        x = x_prev
    return x


@torch.no_grad()
def sample_ddpm(
    model: Model,
    x_T: Tensor,
    s: Schedule,
    *,
    steps: int,
    variance: Variance,
    clip_denoised: bool = True,
    noise_fn: NoiseFn,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) on `steps` trailing timesteps, z = noise_fn(i)."""
    return _sample_loop(
        model,
        x_T,
        s,
        ddpm_plan(s.num_timesteps, steps),
        lambda t, t_prev: ddpm_coefficients(s, t, t_prev, variance),
        clip_denoised,
        noise_fn,
        callback,
    )


@torch.no_grad()
def sample_ddim(
    model: Model,
    x_T: Tensor,
    s: Schedule,
    *,
    steps: int,
    eta: float = 0.0,
    clip_denoised: bool = True,
    noise_fn: NoiseFn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) on `steps` trailing timesteps; noise_fn needed when η > 0."""
    if noise_fn is None and eta != 0:
        raise ValueError("sample_ddim needs a noise_fn when eta > 0")
    return _sample_loop(
        model,
        x_T,
        s,
        ddim_plan(s.num_timesteps, steps),
        lambda t, t_prev: ddim_coefficients(s, t, t_prev, eta),
        clip_denoised,
        noise_fn,
        callback,
    )
