"""The forward process q, its posterior, and the ε-parameterised reverse step p_θ (Ho et al. 2020, §2–3).

Every function takes a per-row timestep tensor t of shape (B,), so one batch may mix timesteps.
Coefficients are gathered from the float64 tables and cast to the dtype of the image tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from app.diffusion.schedule import Schedule, Variance, extract


def q_mean_variance(s: Schedule, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance, log-variance of q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I) (eq. 4); variances (B, 1, …)."""
    mean = extract(s.sqrt_alphas_cumprod, t, x0.shape, dtype=x0.dtype) * x0
    variance = extract(1.0 - s.alphas_cumprod, t, x0.shape, dtype=x0.dtype)
    log_variance = extract(s.log_one_minus_alphas_cumprod, t, x0.shape, dtype=x0.dtype)
    return mean, variance, log_variance


def q_sample(s: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, a draw from q(x_t | x_0) (eq. 4)."""
    return (
        extract(s.sqrt_alphas_cumprod, t, x0.shape, dtype=x0.dtype) * x0
        + extract(s.sqrt_one_minus_alphas_cumprod, t, x0.shape, dtype=x0.dtype) * noise
    )


def q_posterior_mean_variance(
    s: Schedule, x0: Tensor, xt: Tensor, t: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """μ̃_t(x_t, x_0), β̃_t and log β̃_t (clipped at t = 0) of q(x_{t−1} | x_t, x_0) (eq. 6–7)."""
    mean = (
        extract(s.posterior_mean_coef1, t, xt.shape, dtype=xt.dtype) * x0
        + extract(s.posterior_mean_coef2, t, xt.shape, dtype=xt.dtype) * xt
    )
    variance = extract(s.posterior_variance, t, xt.shape, dtype=xt.dtype)
    log_variance_clipped = extract(s.posterior_log_variance_clipped, t, xt.shape, dtype=xt.dtype)
    return mean, variance, log_variance_clipped


def predict_x0_from_eps(s: Schedule, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, eq. 4 solved for x_0 (used in eq. 15)."""
    return (
        extract(s.sqrt_recip_alphas_cumprod, t, xt.shape, dtype=xt.dtype) * xt
        - extract(s.sqrt_recipm1_alphas_cumprod, t, xt.shape, dtype=xt.dtype) * eps
    )


def predict_eps_from_x0(s: Schedule, xt: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """ε = (x_t − √ᾱ_t x_0) / √(1−ᾱ_t), eq. 4 solved for ε."""
    return (extract(s.sqrt_recip_alphas_cumprod, t, xt.shape, dtype=xt.dtype) * xt - x0) / extract(
        s.sqrt_recipm1_alphas_cumprod, t, xt.shape, dtype=xt.dtype
    )


@dataclass(frozen=True)
class PMeanVariance:
    """p_θ(x_{t−1} | x_t) = N(mean, variance) and the x̂_0 it was built from; variances are (B, 1, …)."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_x0: Tensor


def p_mean_variance(
    s: Schedule, eps: Tensor, xt: Tensor, t: Tensor, *, variance: Variance, clip_denoised: bool
) -> PMeanVariance:
    """p_θ(x_{t−1} | x_t) with μ_θ = μ̃_t(x_t, x̂_0(ε_θ)) (eq. 11 via eq. 7) and fixed σ²_t (§3.2)."""
    variance = Variance(variance)
    # As the original code: σ² = β_t (its log uses β̃_1 at t = 0) or σ² = β̃_t (log clipped at t = 0).
    variance_table = s.betas if variance is Variance.BETA else s.posterior_variance
    model_variance = extract(variance_table, t, xt.shape, dtype=xt.dtype)
    model_log_variance = extract(s.model_log_variance(variance), t, xt.shape, dtype=xt.dtype)
    pred_x0 = predict_x0_from_eps(s, xt, t, eps)
    if clip_denoised:
        # Data lives in [−1, 1] (§4); the original sampler clips x̂_0 before the posterior mean.
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    mean, _, _ = q_posterior_mean_variance(s, pred_x0, xt, t)
    return PMeanVariance(mean=mean, variance=model_variance, log_variance=model_log_variance, pred_x0=pred_x0)
