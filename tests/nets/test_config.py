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


# google/ddpm-cifar10-32's scheduler_config.json as diffusers 0.1-0.2 wrote such files.
OLD_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "_name_or_path": "google/ddpm-cifar10-32",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "tensor_format": "pt",
    "timestep_values": None,
    "trained_betas": None,
    "variance_type": "fixed_large",
}


def test_inert_legacy_scheduler_keys_are_dropped_with_a_log_line(caplog):
    caplog.set_level("INFO", logger="app.nets.config")
    config = SchedulerConfig.from_dict(OLD_SCHEDULER)
    assert config == SchedulerConfig(variance_type="fixed_large")
    assert "tensor_format = 'pt'" in caplog.text and "timestep_values = None" in caplog.text
    # diffusers reads the same file as the same scheduler (it ignores both keys)
    assert SchedulerConfig.from_dict(dict(DDPMScheduler.from_config(OLD_SCHEDULER).config)) == config
    # Not inert: a timestep_values that lists timesteps, and keys of other classes, are still refused.
    for key, value in (("timestep_values", [999, 500, 0]), ("set_alpha_to_one", True)):
        with pytest.raises(CheckpointError, match=rf"config key {key!r} = .* is not supported"):
            SchedulerConfig.from_dict(OLD_SCHEDULER | {key: value})


def test_predict_epsilon_is_read_as_prediction_type():
    assert SchedulerConfig.from_dict({"predict_epsilon": True}).prediction_type == "epsilon"
    agreeing = {"predict_epsilon": True, "prediction_type": "epsilon"}
    assert SchedulerConfig.from_dict(agreeing) == SchedulerConfig.from_dict({})
    with pytest.raises(CheckpointError) as e:
        SchedulerConfig.from_dict({"predict_epsilon": False})  # an x₀-predicting network
    assert "'prediction_type' = 'sample' is not supported; supported: 'epsilon'" in str(e.value)
    assert "from 'predict_epsilon' = False" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        SchedulerConfig.from_dict({"predict_epsilon": True, "prediction_type": "v_prediction"})
    assert str(e.value) == (
        "config keys 'predict_epsilon' = True and 'prediction_type' = 'v_prediction' disagree: "
        "'predict_epsilon' = True means prediction_type 'epsilon'; remove one of them"
    )
    with pytest.raises(CheckpointError, match="'predict_epsilon' = 'yes' is not supported"):
        SchedulerConfig.from_dict({"predict_epsilon": "yes"})


def test_private_keys_are_ignored_as_diffusers_does():
    private = {"_diffusers_version": "0.30.0", "_name_or_path": "/somewhere", "_use_default_values": ["x"]}
    assert UNetConfig.from_dict(GOOGLE_CIFAR10 | private) == UNetConfig()
    assert SchedulerConfig.from_dict(private) == SchedulerConfig.from_dict({})


def test_an_absent_sample_size_is_called_absent():
    without = {k: v for k, v in GOOGLE_CIFAR10.items() if k != "sample_size"}
    with pytest.raises(CheckpointError) as e:
        UNetConfig.from_dict(without)
    assert str(e.value).startswith("the config has no 'sample_size'; this service needs the image size")
    assert "None" not in str(e.value)


def test_cosine_is_diffusers_squaredcos_cap_v2():
    cosine = SchedulerConfig(beta_schedule="cosine")
    assert cosine == SchedulerConfig(beta_schedule="squaredcos_cap_v2")
    assert cosine.to_dict()["beta_schedule"] == "squaredcos_cap_v2"
    old_file = cosine.to_dict() | {"beta_schedule": "cosine"}  # as this service wrote them before
    assert SchedulerConfig.from_dict(old_file) == cosine
    theirs = DDPMScheduler.from_config(cosine.to_dict())
    ours = schedule_from(cosine).betas.numpy()
    np.testing.assert_allclose(ours, theirs.betas.numpy(), rtol=1e-6, atol=0)
    # the same cap, max_beta 0.999 (diffusers' betas are float32, ours float64)
    assert ours.max() == 0.999 and theirs.betas.max().item() == pytest.approx(0.999, rel=1e-7)
