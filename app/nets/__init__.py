"""The DDPM U-Net and its checkpoints: nn.Modules and file I/O only (no HTTP, no sampling maths)."""

from app.nets.checkpoint import (
    Checkpoint,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
    unet_from_state_dict,
)
from app.nets.config import SchedulerConfig, UNetConfig
from app.nets.errors import CheckpointError
from app.nets.unet import UNet

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "SchedulerConfig",
    "UNet",
    "UNetConfig",
    "load_checkpoint",
    "read_state_dict",
    "save_checkpoint",
    "unet_from_state_dict",
]
