"""The checkpoints the benchmarks run: always a folder in the diffusers layout, so that ours and diffusers
read the same weights from the same files.

    --model PATH     a checkpoint folder (e.g. models/mnist, or a diffusers pipeline's unet folder)
    --arch NAME      else random weights of an architecture: "bundled" (the shipped MNIST model's; the
                     model itself when models/mnist exists), "tiny" (the tests' 8×8 network, for dry
                     runs) or a preset of the paper ("cifar10", …)
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from app.cli import BUNDLED_MODEL
from app.nets import SchedulerConfig, UNet, UNetConfig, save_checkpoint
from app.nets.presets import PRESETS

# The bundled model's architecture (models/mnist, being trained with `ddpm train --ch 32 --ch-mult 1,2,2
# --num-res-blocks 2 --attn-resolutions 7 --dropout 0.1 --norm-groups 8`): 28×28 greyscale, T = 1000, σ² = β.
BUNDLED_ARCH = replace(
    UNetConfig.ddpm(
        resolution=28, in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,)
    ),
    norm_num_groups=8,
)
# For dry runs (bench/gpu.sh with DEVICE=cpu): the tests' 8×8 greyscale network, ~0.7 M parameters.
TINY_ARCH = UNetConfig.ddpm(
    resolution=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0
)
ARCHS = ("bundled", "tiny", *PRESETS)
_TEMPORARY: list[tempfile.TemporaryDirectory] = []  # removed when the process exits


def architecture(name: str) -> tuple[UNetConfig, SchedulerConfig]:
    if name in ("bundled", "tiny"):
        return BUNDLED_ARCH if name == "bundled" else TINY_ARCH, SchedulerConfig(variance_type="fixed_large")
    if name not in PRESETS:
        raise SystemExit(f"unknown --arch {name!r}; one of {', '.join(ARCHS)}")
    return PRESETS[name].unet, PRESETS[name].scheduler


def model_folder(model: str | None, arch: str) -> tuple[Path, str]:
    """(folder, description): `model`, the bundled model for arch "bundled" when it exists, or random weights
    (seed 0) of `arch` saved in a temporary folder that lives as long as the process."""
    if model:
        return Path(model), model
    if arch == "bundled" and BUNDLED_MODEL.exists():
        return BUNDLED_MODEL, "models/mnist"
    unet_config, scheduler = architecture(arch)
    torch.manual_seed(0)
    _TEMPORARY.append(tempfile.TemporaryDirectory(prefix=f"bench-{arch}-"))
    folder = Path(_TEMPORARY[-1].name)
    save_checkpoint(folder, UNet(unet_config), scheduler)
    return folder, f"random weights, {arch} architecture"
