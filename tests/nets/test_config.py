"""UNetConfig and SchedulerConfig: diffusers' config.json dicts in, the same dicts out, the rest refused."""

import inspect

import numpy as np
import pytest
from diffusers import DDPMScheduler, UNet2DModel

from app.nets.config import SchedulerConfig, UNetConfig
from app.nets.errors import CheckpointError
from app.sampling import schedule_from

# google/ddpm-cifar10-32's config.json as CHECKPOINTS.md gives it (a 2022 file: no dropout key).
GOOGLE_CIFAR10 = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.1.1",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def signature_defaults(cls):
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.name != "self"}


def test_defaults_are_google_cifar10():
    assert UNetConfig.from_dict(GOOGLE_CIFAR10) == UNetConfig()


def test_missing_keys_take_diffusers_defaults_not_ours():
    expected = {k: tuple(v) if isinstance(v, list) else v for k, v in signature_defaults(UNet2DModel).items()}
    assert UNetConfig.diffusers_defaults() == expected
    assert SchedulerConfig.diffusers_defaults() == signature_defaults(DDPMScheduler)
    minimal = UNetConfig.from_dict({"sample_size": 32, "block_out_channels": [32, 64, 64, 64]})
    assert (minimal.freq_shift, minimal.flip_sin_to_cos, minimal.norm_eps) == (0, True, 1e-5)
    assert SchedulerConfig.from_dict({}).variance_type == "fixed_small"


@pytest.mark.parametrize(
    "config",
    [
        UNetConfig(),
        UNetConfig.ddpm(resolution=28, in_channels=1, ch=32, ch_mult=(1, 2, 2), attn_resolutions=(7,)),
    ],
)
def test_unet_config_round_trips_through_diffusers(config):
    d = config.to_dict()
    assert d["_class_name"] == "UNet2DModel"
    assert UNetConfig.from_dict(d) == config
    theirs = UNet2DModel.from_config(d)
    assert UNetConfig.from_dict(dict(theirs.config)) == config


def test_scheduler_config_round_trips_through_diffusers():
    config = SchedulerConfig(variance_type="fixed_small", trained_betas=None, timestep_spacing="trailing")
    d = config.to_dict()
    assert d["_class_name"] == "DDPMScheduler"
    theirs = DDPMScheduler.from_config(d)
    assert SchedulerConfig.from_dict(dict(theirs.config)) == config


@pytest.mark.parametrize(
    ("key", "value", "supported"),
    [
        ("time_embedding_type", "fourier", "'positional'"),
        ("resnet_time_scale_shift", "scale_shift", "'default'"),
        ("class_embed_type", "timestep", "None"),
        ("num_class_embeds", 10, "None"),
        (
            "down_block_types",
            ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            "AttnDownBlock2D",
        ),
        ("mid_block_type", None, "'UNetMidBlock2D'"),
        ("attention_head_dim", 48, "an int dividing"),
        ("norm_num_groups", None, "an int dividing every channel count in [128, 256]"),
        ("sample_size", None, "an int divisible by 2**3"),
        ("flux_capacitor", 1.21, "UNet2DModel keys"),
        ("_class_name", "UNet2DConditionModel", "'UNet2DModel'"),
    ],
)
def test_unsupported_unet_config_values_are_refused_by_name(key, value, supported):
    with pytest.raises(CheckpointError) as e:
        UNetConfig.from_dict(GOOGLE_CIFAR10 | {key: value})
    assert f"{key!r} = {value!r}" in str(e.value)
    assert supported in str(e.value)


@pytest.mark.parametrize(
    ("key", "value", "supported"),
    [
        ("prediction_type", "v_prediction", "'epsilon'"),
        ("variance_type", "learned_range", "fixed_large"),
        ("variance_type", "learned", "fixed_small"),
        ("beta_schedule", "sigmoid", "squaredcos_cap_v2"),
        ("clip_everything", True, "DDPMScheduler keys"),
        # What diffusers' samplers would do with these, ours would not: refused, not silently ignored.
        ("thresholding", True, "false"),
        ("rescale_betas_zero_snr", True, "false"),
        ("clip_sample_range", 2.0, "1.0"),
        ("num_train_timesteps", 1, "at least 2"),
        ("beta_end", 1.5, "(0, 1)"),
        ("beta_start", 0.0, "(0, 1)"),
    ],
)
def test_unsupported_scheduler_values_are_refused_by_name(key, value, supported):
    with pytest.raises(CheckpointError) as e:
        SchedulerConfig.from_dict({key: value})
    assert f"{key!r} = {value!r}" in str(e.value)
    assert supported in str(e.value)


def test_ddpm_terms():
    assert UNetConfig.ddpm(resolution=32) == UNetConfig(dropout=0.1)
    mnist = UNetConfig.ddpm(resolution=28, in_channels=1, ch=64, ch_mult=(1, 2, 2), attn_resolutions=(14,))
    assert mnist.block_out_channels == (64, 128, 128)
    assert mnist.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
    assert mnist.up_block_types == ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert (mnist.in_channels, mnist.out_channels, mnist.sample_size) == (1, 1, 28)
    with pytest.raises(ValueError, match=r"attn_resolutions \[8\] match no level"):
        UNetConfig.ddpm(resolution=28, ch_mult=(1, 2, 2), attn_resolutions=(8,))


def test_trained_betas_are_the_schedule_when_given():
    betas = np.linspace(1e-3, 0.05, 40).tolist()
    config = SchedulerConfig.from_dict({"trained_betas": betas, "num_train_timesteps": 40})
    theirs = DDPMScheduler.from_config(config.to_dict())
    np.testing.assert_allclose(schedule_from(config).betas.numpy(), theirs.betas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        schedule_from(config).alphas_cumprod.numpy(), theirs.alphas_cumprod.numpy(), rtol=1e-5
    )
    for bad in ([0.1] * 39, [0.1] * 39 + [1.0]):
        with pytest.raises(CheckpointError, match="trained_betas"):
            SchedulerConfig.from_dict({"trained_betas": bad, "num_train_timesteps": 40})
