"""The variational bound L = L_T + Σ_{t>1} L_{t−1} + L_0 in bits/dim (Ho et al. 2020, eq. 5, §3.3).

A port of the original code (diffusion_utils_2.py: `_prior_bpd`, `_vb_terms_bpd`, `calc_bpd_loop`;
nn.py: `normal_kl`, `discretized_gaussian_log_likelihood`), with per-row timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from app.diffusion.gaussian import p_mean_variance, q_mean_variance, q_posterior_mean_variance, q_sample
from app.diffusion.samplers import Callback, Model
from app.diffusion.schedule import Schedule, Variance


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: Tensor | float, logvar1: Tensor | float, mean2: Tensor | float, logvar2: Tensor | float
) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats; plain floats broadcast."""
    ref = next(x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, Tensor))
    mean1, logvar1, mean2, logvar2 = (
        torch.as_tensor(x, dtype=ref.dtype, device=ref.device) for x in (mean1, logvar1, mean2, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))), the original code's approximation of the normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) of the discrete decoder of §3.3 (eq. 13): 256 bins of width 2/255 on [−1, 1], edge bins to ±∞.

    x must lie on the bin centres −1 + 2k/255; computed exactly as the original code (1e-12 floors,
    ±0.999 edge tests).
    """
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def prior_bpd(s: Schedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)) per row, in bits/dim (eq. 5)."""
    t = torch.full((x0.shape[0],), s.num_timesteps - 1, dtype=torch.long, device=x0.device)
    mean, _, log_variance = q_mean_variance(s, x0, t)
    return _mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


def vb_terms_bpd(
    s: Schedule, eps: Tensor, x0: Tensor, xt: Tensor, t: Tensor, *, variance: Variance, clip_denoised: bool
) -> tuple[Tensor, Tensor]:
    """(L_{t−1} per row in bits/dim, x̂_0), eq. 5: a Gaussian KL for rows with t > 0, the decoder NLL at t = 0.

    Rows with t > 0: KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)); rows with t = 0: −log p_θ(x_0 | x_1).
    """
    true_mean, _, true_log_variance = q_posterior_mean_variance(s, x0, xt, t)
    out = p_mean_variance(s, eps, xt, t, variance=variance, clip_denoised=clip_denoised)
    kl = _mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / math.log(2.0)
    log_scales = (0.5 * out.log_variance).expand_as(x0)
    decoder_nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, means=out.mean, log_scales=log_scales))
    decoder_nll = decoder_nll / math.log(2.0)
    return torch.where(t == 0, decoder_nll, kl), out.pred_x0


@dataclass(frozen=True)
class BoundResult:
    """The bound per row in bits/dim: total = prior + terms.sum(1).

    Column t of terms_bpd is computed at timestep index t (the paper's step t+1), so it is the paper's L_t:
    L_0 the decoder NLL, L_1..L_{T−1} the KL terms.
    """

    total_bpd: Tensor  # (B,)
    prior_bpd: Tensor  # (B,) L_T
    terms_bpd: Tensor  # (B, T)
    x0_mse: Tensor  # (B, T), mean squared error of x̂_0 at each t

    @property
    def decoder_bpd(self) -> Tensor:
        """L_0, the discrete decoder's NLL (B,)."""
        return self.terms_bpd[:, 0]

    @property
    def diffusion_bpd(self) -> Tensor:
        """Σ_{t>1} L_{t−1}, the KL terms (B,)."""
        return self.terms_bpd[:, 1:].sum(dim=1)


@torch.no_grad()
def calc_bpd_loop(
    model: Model,
    x0: Tensor,
    s: Schedule,
    *,
    variance: Variance,
    clip_denoised: bool = True,
    noise_fn: Callable[[int], Tensor],
    callback: Callback | None = None,
) -> BoundResult:
    """The whole bound, eq. 5, one term per t = T−1..0 at x_t = q_sample(x_0, t, noise_fn(t)) (calc_bpd_loop).

    callback(i, t, x_t, pred_x0) is called after the i-th evaluated term.
    """
    batch, num_timesteps = x0.shape[0], s.num_timesteps
    terms = x0.new_zeros(batch, num_timesteps)
    mse = x0.new_zeros(batch, num_timesteps)
    for i, t in enumerate(range(num_timesteps - 1, -1, -1)):
        t_row = torch.full((batch,), t, dtype=torch.long, device=x0.device)
        xt = q_sample(s, x0, t_row, noise_fn(t))
        bpd, pred_x0 = vb_terms_bpd(
            s, model(xt, t_row), x0, xt, t_row, variance=variance, clip_denoised=clip_denoised
        )
        terms[:, t] = bpd
        mse[:, t] = _mean_flat((pred_x0 - x0) ** 2)
        if callback is not None:
            callback(i, t_row, xt, pred_x0)
    prior = prior_bpd(s, x0)
    return BoundResult(total_bpd=terms.sum(dim=1) + prior, prior_bpd=prior, terms_bpd=terms, x0_mse=mse)
