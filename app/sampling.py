"""The library entry point: load a model, run a sampler for a batch with per-image seeds.

ckpt = resolve_model("models/mnist")
result = generate(ckpt, n=16, steps=50, sampler="ddim", seed=0)
result.images  # (16, C, H, W) in [-1, 1]; image k depends only on (seed, k)
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.diffusion import Schedule, Variance, sample_ddim, sample_ddpm
from app.nets import Checkpoint, SchedulerConfig
from app.rng import ImageNoise

StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
SAMPLERS = ("ddpm", "ddim")


@dataclass(frozen=True)
class Samples:
    images: torch.Tensor  # (n, C, H, W) float32 in [-1, 1], on the CPU
    seed: int
    steps: int


def schedule_of(ckpt: Checkpoint) -> Schedule:
    return schedule_from(ckpt.scheduler)


def schedule_from(config: SchedulerConfig) -> Schedule:
    """β_1..β_T of a scheduler config: its `trained_betas` when it lists them, else its named schedule."""
    if config.trained_betas is not None:
        return Schedule(config.trained_betas)
    return Schedule.from_config(
        config.beta_schedule, config.num_train_timesteps, config.beta_start, config.beta_end
    )


def default_variance(ckpt: Checkpoint) -> Variance:
    return Variance.from_diffusers(ckpt.scheduler.variance_type)


def random_seed() -> int:
    return secrets.randbits(63)


@torch.no_grad()
def generate(
    ckpt: Checkpoint,
    *,
    n: int,
    steps: int | None = None,
    sampler: str = "ddpm",
    eta: float = 0.0,
    variance: Variance | str | None = None,
    clip_denoised: bool = True,
    seed: int | None = None,
    latents: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Samples:
    """Sample `n` images with Algorithm 2 (sampler="ddpm") or DDIM, on the checkpoint's device.

    `steps` < T uses the trailing subsequence of timesteps; `callback(i, t, x_t, x̂₀)` runs after
    every step. `latents` (n, C, H, W) replaces x_T; the per-step noise still comes from (seed, k).
    `model` is the ε_θ(x_t, t) to call instead of the plain `ckpt.unet`, e.g. the engine's fast path
    (`app.engine.fastpath.Forward` of the same U-Net).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    T = ckpt.scheduler.num_train_timesteps
    steps = T if steps is None else steps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    seed = random_seed() if seed is None else seed
    device = ckpt.device
    shape = (ckpt.channels, ckpt.resolution, ckpt.resolution)
    if latents is not None and tuple(latents.shape) != (n, *shape):
        raise ValueError(f"latents must have shape {(n, *shape)}, got {tuple(latents.shape)}")
    noise = ImageNoise(seed, range(n), shape, device)
    x_T = noise.randn() if latents is None else latents.to(device, torch.float32)
    schedule = schedule_of(ckpt).to(device)
    unet = ckpt.unet.eval() if model is None else model
    if sampler == "ddpm":
        variance = default_variance(ckpt) if variance is None else Variance(variance)
        x0 = sample_ddpm(
            unet,
            x_T,
            schedule,
            steps=steps,
            variance=variance,
            clip_denoised=clip_denoised,
            noise_fn=lambda i: noise.randn(),
            callback=callback,
        )
    else:
        x0 = sample_ddim(
            unet,
            x_T,
            schedule,
            steps=steps,
            eta=eta,
            clip_denoised=clip_denoised,
            noise_fn=lambda i: noise.randn(),
            callback=callback,
        )
    return Samples(images=x0.float().cpu(), seed=seed, steps=steps)
