"""The tiny 8×8 greyscale DDPM the tests share (~0.7 M parameters, ~10 ms per forward on one core)."""

from __future__ import annotations

from pathlib import Path

import torch

from app.nets import Checkpoint, SchedulerConfig, UNet, UNetConfig, save_checkpoint

# Images from float32 chains whose forwards ran in batches of different sizes. oneDNN picks its kernels
# by batch size, so ε differs in the last bits, and a few chain steps grow that to about 1e-5 (1.16e-5
# seen in CI, 6.8e-6 in docs/benchmarks.md). A wrong noise stream or a mixed-up row differs by 0.1-1.
BATCH_ATOL = 1e-4

TINY_CONFIG = UNetConfig.ddpm(
    resolution=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0
)


def tiny_unet(seed: int = 0, config: UNetConfig = TINY_CONFIG) -> UNet:
    torch.manual_seed(seed)
    return UNet(config).eval()


def tiny_checkpoint(*, timesteps: int = 40, variance_type: str = "fixed_large", seed: int = 0) -> Checkpoint:
    scheduler = SchedulerConfig(num_train_timesteps=timesteps, variance_type=variance_type)
    return Checkpoint(unet=tiny_unet(seed), scheduler=scheduler, name="tiny", source="test")


def save_tiny(folder: Path, **kw) -> Path:
    """`tiny_checkpoint(**kw)` saved in the diffusers layout."""
    ckpt = tiny_checkpoint(**kw)
    return save_checkpoint(folder, ckpt.unet, ckpt.scheduler)
