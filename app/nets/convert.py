"""Original-format checkpoints: the key names of the PyTorch port of the TF code (pesser/pytorch_diffusion,
`model-790000.ckpt` and friends) mapped to and from diffusers' UNet2DModel names.

The original `up.{i}` is indexed by resolution (`up.0` is the highest), diffusers' `up_blocks` by order of
use, so `up.{i}` is `up_blocks.{L−1−i}`. Attention projections are 1×1 convolutions there ([C, C, 1, 1]),
linear layers here ([C, C]).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor

from app.nets.checkpoint import check_state_dict, read_state_dict, save_checkpoint, unet_from_state_dict
from app.nets.config import UNetConfig
from app.nets.errors import CheckpointError
from app.nets.presets import PRESETS, Preset
from app.nets.unet import UNet

# Whole-module renames, diffusers -> original.
_MODULES = {
    "time_embedding.linear_1": "temb.dense.0",
    "time_embedding.linear_2": "temb.dense.1",
    "conv_norm_out": "norm_out",
    "mid_block.resnets.0": "mid.block_1",
    "mid_block.attentions.0": "mid.attn_1",
    "mid_block.resnets.1": "mid.block_2",
}
_LEVEL = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers\.0|upsamplers\.0)\.(.+)")
_PARTS = {
    "resnets": "block",
    "attentions": "attn",
    "downsamplers.0": "downsample",
    "upsamplers.0": "upsample",
}
_LEAF = re.compile(r"\.(time_emb_proj|conv_shortcut|group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")
_LEAVES = {
    "time_emb_proj": "temb_proj",
    "conv_shortcut": "nin_shortcut",
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
ATTENTION_PROJECTION = re.compile(r".*\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight")
ORIGINAL_FORMAT_MARKER = "temb.dense.0.weight"
DIFFUSERS_FORMAT_MARKER = "time_embedding.linear_1.weight"
# What `convert` reads, in words for error messages.
ORIGINAL_WEIGHTS_FILE = "the original-format checkpoint file (.ckpt, .pt, .pth or .safetensors)"


def original_key(key: str, levels: int) -> str:
    """The original-format name of the diffusers key `key` in a U-Net with `levels` resolutions."""
    for new, old in _MODULES.items():
        if key.startswith(new + "."):
            key = old + key[len(new) :]
    level = _LEVEL.fullmatch(key)
    if level:
        index = int(level[2]) if level[1] == "down" else levels - 1 - int(level[2])
        key = f"{level[1]}.{index}.{_PARTS[level[3]]}.{level[4]}"
    return _LEAF.sub(lambda m: f".{_LEAVES[m[1]]}.{m[2]}", key)


def _diffusers_shapes(config: UNetConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in UNet(config).state_dict().items()}


def is_original_format(state: dict[str, Tensor]) -> bool:
    return ORIGINAL_FORMAT_MARKER in state


def is_diffusers_format(state: dict[str, Tensor]) -> bool:
    """Whether `state` names its tensors as diffusers' UNet2DModel does (time_embedding.linear_1…)."""
    return DIFFUSERS_FORMAT_MARKER in state and not is_original_format(state)


def convert_original_state_dict(state: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """Original-format tensors renamed to diffusers' names for `config`; every key must be used and every
    parameter produced with its shape, else CheckpointError."""
    shapes = _diffusers_shapes(config)
    names = {original_key(k, len(config.block_out_channels)): k for k in shapes}
    expected = {
        old: torch.Size((*shapes[new][:2], 1, 1)) if ATTENTION_PROJECTION.fullmatch(new) else shapes[new]
        for old, new in names.items()
    }
    check_state_dict(expected, state, what="original-format weights")
    return {
        names[old]: value[:, :, 0, 0] if ATTENTION_PROJECTION.fullmatch(names[old]) else value
        for old, value in state.items()
    }


def to_original_state_dict(state: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """The inverse of `convert_original_state_dict`: diffusers-named tensors in the original format."""
    check_state_dict(_diffusers_shapes(config), state, what="diffusers weights")
    levels = len(config.block_out_channels)
    return {
        original_key(k, levels): v[:, :, None, None] if ATTENTION_PROJECTION.fullmatch(k) else v
        for k, v in state.items()
    }


def convert_original_checkpoint(
    weights_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, preset: str | Preset
) -> Path:
    """Read an original-format .ckpt/.pt/.pth (weights-only) or .safetensors file and save it in our
    (diffusers) layout under `out_dir` with the preset's scheduler config."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise CheckpointError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    state = read_state_dict(weights_path)
    if is_diffusers_format(state):
        raise CheckpointError(
            f"{weights_path}: these weights have diffusers' key names already (time_embedding.linear_1, "
            f"down_blocks…) and need no converting; load them as PRESET:WEIGHTS, e.g. --model "
            f"{preset.name}:{weights_path}"
        )
    try:
        converted = convert_original_state_dict(state, preset.unet)
    except CheckpointError as e:
        raise CheckpointError(f"{weights_path}: {e}") from None
    unet = unet_from_state_dict(preset.unet, converted, source=str(weights_path))
    return save_checkpoint(out_dir, unet, preset.scheduler)
