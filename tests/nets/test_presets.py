"""The paper's five models: architectures as google/ddpm-* on the hub (CHECKPOINTS.md), sizes as the paper."""

import pytest
import torch
from diffusers import UNet2DModel

from app.nets.presets import PRESETS

COMMON = {
    "act_fn": "silu",
    "attention_head_dim": None,
    "center_input_sample": False,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "add_attention": True,
}
D, AD, U, AU = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"
CIFAR10 = {
    "sample_size": 32,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": [D, AD, D, D],
    "up_block_types": [U, U, AU, U],
}
LARGE = {
    "sample_size": 256,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": [D, D, D, D, AD, D],
    "up_block_types": [U, AU, U, U, U, U],
}
TABLE = {"cifar10": CIFAR10, "celebahq": LARGE, "church": LARGE, "bedroom": LARGE, "cat": LARGE}


def test_the_five_models():
    assert list(PRESETS) == ["cifar10", "celebahq", "church", "bedroom", "cat"]
    for name, preset in PRESETS.items():
        assert preset.name == name
        assert preset.hub_repo == f"google/ddpm-{name}-{TABLE[name]['sample_size']}"


@pytest.mark.parametrize("name", list(TABLE))
def test_architecture_matches_the_hub_config(name):
    config = PRESETS[name].unet.to_dict()
    assert {k: config[k] for k in COMMON | TABLE[name]} == COMMON | TABLE[name]
    assert config["dropout"] == (0.1 if name == "cifar10" else 0.0)  # the paper's training dropout


@pytest.mark.parametrize("name", list(TABLE))
def test_forward_process_and_variance(name):
    scheduler = PRESETS[name].scheduler
    assert (scheduler.num_train_timesteps, scheduler.beta_start, scheduler.beta_end) == (1000, 1e-4, 0.02)
    assert (scheduler.beta_schedule, scheduler.clip_sample, scheduler.prediction_type) == (
        "linear",
        True,
        "epsilon",
    )
    assert scheduler.variance_type == ("fixed_large" if name == "cifar10" else "fixed_small")


@pytest.mark.parametrize(("name", "millions", "digits"), [("cifar10", 35.7, 1), ("church", 114, 0)])
def test_parameter_counts_as_the_paper_and_diffusers(name, millions, digits):
    config = PRESETS[name].unet
    with torch.device("meta"):
        theirs = sum(p.numel() for p in UNet2DModel.from_config(config.to_dict()).parameters())
    assert config.num_parameters() == theirs
    assert round(theirs / 1e6, digits) == millions
