"""Noise schedules β_1..β_T and the precomputed tables of the forward process (Ho et al. 2020, §2).

Index t = 0..T−1 here is the paper's t = 1..T (as in the original code and diffusers). Tables are
float64 so that products such as ᾱ_t stay accurate at large t; `extract` casts per use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum

import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2")


def _linspace(start: float, stop: float, num: int) -> Tensor:
    # Same arithmetic as numpy.linspace (i·step + start, last value set to stop), so schedules
    # are bit-identical to the original code's np.linspace.
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    out = torch.arange(num, dtype=torch.float64) * step + start
    out[-1] = stop
    return out


def _cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> Tensor:
    # Nichol & Dhariwal 2021, eq. 17, s = 0.008; β_t = 1 − ᾱ(t+1)/ᾱ(t) capped at max_beta,
    # exactly as diffusers' betas_for_alpha_bar (but kept in float64).
    def alpha_bar_fn(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar_fn((i + 1) / num_timesteps) / alpha_bar_fn(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(kind: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """β_1..β_T as float64: "linear" (Ho et al. 2020, §4), "scaled_linear", "cosine" (Nichol & Dhariwal 2021).

    "squaredcos_cap_v2" is diffusers' name for "cosine"; the cosine schedule ignores beta_start/beta_end.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
    if kind == "linear":
        return _linspace(beta_start, beta_end, num_timesteps)
    if kind == "scaled_linear":
        # Linear in √β (latent diffusion); diffusers' name.
        return _linspace(beta_start**0.5, beta_end**0.5, num_timesteps) ** 2
    if kind in ("cosine", "squaredcos_cap_v2"):
        return _cosine_betas(num_timesteps)
    raise ValueError(f"unknown beta schedule {kind!r}; choose one of {', '.join(BETA_SCHEDULES)}")


class Variance(StrEnum):
    """The fixed reverse-process variance σ²_t of Ho et al. 2020, §3.2."""

    BETA = "beta"  # σ²_t = β_t: optimal for x_0 ~ N(0, I); diffusers "fixed_large"
    POSTERIOR = "posterior"  # σ²_t = β̃_t: optimal for x_0 a point; diffusers "fixed_small"

    @classmethod
    def from_diffusers(cls, variance_type: str) -> Variance:
        """Map a diffusers `variance_type` onto the paper's two fixed variances."""
        if variance_type in ("fixed_large", "fixed_large_log"):
            return cls.BETA
        if variance_type in ("fixed_small", "fixed_small_log"):
            return cls.POSTERIOR
        raise ValueError(
            f"unsupported diffusers variance_type {variance_type!r}; "
            "only fixed_small(_log) and fixed_large(_log) are fixed variances"
        )


_TABLES = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


class Schedule:
    """Float64 tables (length T) of q(x_t | x_{t−1}) = N(√(1−β_t) x_{t−1}, β_t I) and of its posterior."""

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    log_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    def __init__(self, betas: Tensor | Sequence[float]) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be 1-D with at least 2 entries, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must satisfy 0 < β < 1")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])

        self.betas = betas
        self.alphas = alphas
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = alphas_cumprod_prev
        # q(x_t | x_0), eq. 4
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1.0).sqrt()
        # q(x_{t−1} | x_t, x_0), eq. 6–7: β̃_t and the two weights of μ̃_t
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # β̃_0 = 0, so its log is replaced by log β̃_1, as the original code does.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod)

    @classmethod
    def from_config(
        cls, kind: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> Schedule:
        """Schedule of `make_betas(kind, num_timesteps, beta_start, beta_end)`."""
        return cls(make_betas(kind, num_timesteps, beta_start, beta_end))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> Schedule:
        """A copy with every table on `device` (float64, or float32 where the device lacks float64: mps)."""
        device = torch.device(device)
        dtype = torch.float32 if device.type == "mps" else torch.float64
        out = object.__new__(Schedule)
        for name in _TABLES:
            setattr(out, name, getattr(self, name).to(device=device, dtype=dtype))
        return out

    def model_log_variance(self, variance: Variance | str) -> Tensor:
        """log σ²_t of the reverse process for a fixed variance (the original's fixedlarge/fixedsmall)."""
        if Variance(variance) is Variance.BETA:
            # log β_t, with log β̃_1 at t = 0 (the decoder of L_0), exactly as the original code.
            return torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]]))
        return self.posterior_log_variance_clipped

    def __repr__(self) -> str:
        return f"Schedule(num_timesteps={self.num_timesteps}, device={self.device})"


def extract(table: Tensor, t: Tensor, shape: Sequence[int], *, dtype: torch.dtype = torch.float32) -> Tensor:
    """table[t] per row, cast to `dtype`, shaped (B, 1, …, 1) to broadcast against `shape`.

    improved-diffusion's _extract_into_tensor, without the expand. Callers in this package pass their
    input's dtype, so float64 inputs keep float64 coefficients.
    """
    out = table.to(t.device)[t].to(dtype)
    return out.reshape(t.shape[0], *([1] * (len(shape) - 1)))


def alpha_bar(schedule: Schedule, t: Tensor) -> Tensor:
    """ᾱ_t per row (B,), in the table dtype, with ᾱ_{−1} = 1: t = −1 is x_0, the end of the reverse chain."""
    alphas_cumprod = schedule.alphas_cumprod.to(t.device)
    return torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], 1.0)
