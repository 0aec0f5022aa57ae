"""The DDPM U-Net and its checkpoints: nn.Modules and file I/O only (no HTTP, no sampling maths)."""

from app.nets.checkpoint import (
    Checkpoint,
    check_state_dict,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
    unet_from_state_dict,
)
from app.nets.config import SchedulerConfig, UNetConfig
from app.nets.convert import convert_original_checkpoint, convert_original_state_dict, to_original_state_dict
from app.nets.errors import CheckpointError
from app.nets.presets import PRESETS, Preset
from app.nets.resolve import resolve_model
from app.nets.unet import UNet

__all__ = [
    "PRESETS",
    "Checkpoint",
    "CheckpointError",
    "Preset",
    "SchedulerConfig",
    "UNet",
    "UNetConfig",
    "check_state_dict",
    "convert_original_checkpoint",
    "convert_original_state_dict",
    "load_checkpoint",
    "read_state_dict",
    "resolve_model",
    "save_checkpoint",
    "to_original_state_dict",
    "unet_from_state_dict",
]
