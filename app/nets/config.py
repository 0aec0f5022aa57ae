"""The two config.json files of a diffusers checkpoint: `UNetConfig` (UNet2DModel) and `SchedulerConfig`
(DDPMScheduler), as frozen dataclasses that refuse what this project cannot reproduce."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from app.nets.errors import CheckpointError

log = logging.getLogger(__name__)

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")

# Keys whose other values would build a different network than this module implements.
_ONLY_VALUES: dict[str, tuple[Any, ...]] = {
    "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default",),
    "act_fn": ("silu", "swish"),
    "mid_block_type": ("UNetMidBlock2D",),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
}

# diffusers' UNet2DModel __init__ defaults where they differ from UNetConfig's (google/ddpm-cifar10-32's):
# what diffusers assumes for a key a config.json leaves out, so `from_dict` fills gaps with these.
_DIFFUSERS_DIFFERENT_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "downsample_padding": 1,
    "attention_head_dim": 8,
    "norm_eps": 1e-5,
}


def _unsupported(key: str, value: Any, supported: str) -> CheckpointError:
    return CheckpointError(f"config key {key!r} = {value!r} is not supported; supported: {supported}")


def _merge(
    d: Mapping[str, Any], defaults: dict[str, Any], class_name: str, inert: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """`defaults` updated with the config.json dict `d`, lists made tuples. Private keys ("_class_name",
    "_diffusers_version", "_name_or_path", …) are ignored, as diffusers does, once "_class_name" is checked;
    the keys of `inert` (key: why it changes nothing) are dropped with a log line; other unknown keys are
    refused, since they could change the network or the maths."""
    if d.get("_class_name", class_name) != class_name:
        raise _unsupported("_class_name", d["_class_name"], repr(class_name))
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if not k.startswith("_")}
    for key, why in (inert or {}).items():
        if key in given and key not in defaults:
            log.info("%s config: ignoring %s = %r (%s)", class_name, key, given.pop(key), why)
    for key in sorted(given.keys() - defaults.keys()):
        raise _unsupported(key, given[key], f"the {class_name} keys {', '.join(sorted(defaults))}")
    return defaults | given


def _as_json(config: Any, class_name: str) -> dict[str, Any]:
    d: dict[str, Any] = {"_class_name": class_name}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        d[f.name] = list(value) if isinstance(value, tuple) else value
    return d


@dataclass(frozen=True)
class UNetConfig:
    """diffusers' `UNet2DModel` config keys; the defaults are google/ddpm-cifar10-32's config.json."""

    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None  # None: 4 × block_out_channels[0]
    freq_shift: float = 1
    flip_sin_to_cos: bool = False
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    mid_block_type: str = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 0
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = None  # None: one head as wide as the channels
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None  # mid-block attention only; None: norm_num_groups
    norm_eps: float = 1e-6
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True  # attention in the mid block
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None  # used by diffusers' "learned" embedding only

    def __post_init__(self) -> None:
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        for key, allowed in _ONLY_VALUES.items():
            if getattr(self, key) not in allowed:
                raise _unsupported(key, getattr(self, key), " or ".join(map(repr, allowed)))
        for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            for value in getattr(self, key):
                if value not in allowed:
                    raise _unsupported(key, getattr(self, key), f"a sequence of {' / '.join(allowed)}")
        levels = len(self.block_out_channels)
        if not levels or len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise CheckpointError(
                "config keys 'block_out_channels', 'down_block_types' and 'up_block_types' must have the "
                f"same length, got {self.block_out_channels!r}, {self.down_block_types!r}, "
                f"{self.up_block_types!r}"
            )
        if not isinstance(self.sample_size, int) or self.sample_size % 2 ** (levels - 1):
            raise _unsupported("sample_size", self.sample_size, f"an int divisible by 2**{levels - 1}")
        kinds = zip(
            self.block_out_channels + self.block_out_channels[::-1],
            self.down_block_types + self.up_block_types,
            strict=True,
        )
        attended = [c for c, kind in kinds if kind.startswith("Attn")]
        attended += [self.block_out_channels[-1]] if self.add_attention else []
        for key, widths in (
            ("norm_num_groups", self.block_out_channels),
            ("attn_norm_num_groups", self.block_out_channels[-1:]),
            ("attention_head_dim", attended),
        ):
            value = getattr(self, key)
            optional = key != "norm_num_groups"
            if not (value is None and optional) and (
                not isinstance(value, int) or value <= 0 or any(w % value for w in widths)
            ):
                raise _unsupported(
                    key, value, f"an int dividing every channel count in {sorted(set(widths))}"
                )

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        """From a diffusers config.json dict; keys starting with "_" are ignored, missing keys take
        diffusers' defaults (but `sample_size`, the image size, is required), anything this network cannot
        reproduce raises CheckpointError."""
        if "sample_size" not in d:  # diffusers' default is None: a network of no particular size
            raise CheckpointError(
                "the config has no 'sample_size'; this service needs the image size: add \"sample_size\": N "
                "(the height and width of the images the model was trained on)"
            )
        return cls(**_merge(d, cls.diffusers_defaults(), "UNet2DModel"))

    @classmethod
    def diffusers_defaults(cls) -> dict[str, Any]:
        """The value diffusers' UNet2DModel gives each key a config.json leaves out."""
        return {f.name: f.default for f in dataclasses.fields(cls)} | _DIFFUSERS_DIFFERENT_DEFAULTS

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that diffusers' `UNet2DModel.from_config` turns into the same network."""
        return _as_json(self, "UNet2DModel")

    @classmethod
    def ddpm(
        cls,
        *,
        resolution: int,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        norm_num_groups: int = 32,
    ) -> UNetConfig:
        """The original code's hyperparameters (`diffusion_tf/models/unet.py: model`) in diffusers terms:
        attention at every level whose input resolution is in `attn_resolutions`, up path mirrored.
        `norm_num_groups` is the paper's 32 unless a small model needs fewer (GroupNorm(32) on 32
        channels is an instance norm, which loses each channel's mean)."""
        level_resolutions = [resolution // 2**i for i in range(len(ch_mult))]
        missing = sorted(set(attn_resolutions) - set(level_resolutions))
        if missing:
            raise ValueError(f"attn_resolutions {missing} match no level; the levels are {level_resolutions}")
        attention = [r in attn_resolutions for r in level_resolutions]
        return cls(
            sample_size=resolution,
            in_channels=in_channels,
            out_channels=in_channels,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            block_out_channels=tuple(ch * m for m in ch_mult),
            layers_per_block=num_res_blocks,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
        )

    def num_parameters(self) -> int:
        """Parameter count of the network, without allocating it."""
        from app.nets.unet import UNet  # the network module imports this one

        with torch.device("meta"):
            return UNet(self).num_parameters()


# As app.diffusion.schedule: "cosine" is this project's name for diffusers' "squaredcos_cap_v2" (the same
# betas: Nichol & Dhariwal's s = 0.008, each capped at 0.999). Read as either, kept and written as diffusers'.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
_DIFFUSERS_SCHEDULE_NAMES = {"cosine": "squaredcos_cap_v2"}
# Scheduler keys of older diffusers that change nothing here: dropped with a log line, as diffusers does.
_INERT_SCHEDULER_KEYS = {"tensor_format": "early diffusers' array library (np or pt), not the maths"}
# DDPMScheduler's `predict_epsilon` (diffusers 0.7-0.11), replaced by `prediction_type`.
_PREDICT_EPSILON = {True: "epsilon", False: "sample"}


def _legacy_scheduler_keys(d: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """`d` with the older diffusers' spellings of DDPMScheduler keys in today's terms, and a note naming
    what was translated ("" if nothing). `predict_epsilon` becomes `prediction_type` (diffusers 0.7-0.11 did
    the same); early diffusers' unused `timestep_values`, when null, is dropped."""
    d = dict(d)
    note = ""
    if "timestep_values" in d and d["timestep_values"] is None:
        log.info("DDPMScheduler config: ignoring timestep_values = None (early diffusers', unused)")
        del d["timestep_values"]
    if "predict_epsilon" in d:
        value = d.pop("predict_epsilon")
        if not isinstance(value, bool):
            raise _unsupported("predict_epsilon", value, "true or false (diffusers 0.7-0.11)")
        mapped = _PREDICT_EPSILON[value]
        given = d.get("prediction_type", mapped)
        if given != mapped:
            raise CheckpointError(
                f"config keys 'predict_epsilon' = {value!r} and 'prediction_type' = {given!r} disagree: "
                f"'predict_epsilon' = {value!r} means prediction_type {mapped!r}; remove one of them"
            )
        d["prediction_type"] = mapped
        note = f"from 'predict_epsilon' = {value!r}: diffusers 0.7-0.11's prediction_type {mapped!r}"
    return d, note


# ε-prediction with the paper's fixed variances: β_t ("large") or β̃_t ("small"), plain or as a log.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


@dataclass(frozen=True)
class SchedulerConfig:
    """diffusers' `DDPMScheduler` config keys: the forward process of the checkpoint (Section 2, β_1..β_T) and
    the reverse-process variance it was sampled with. Defaults are the paper's CIFAR10 model."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    variance_type: str = "fixed_large"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    # Kept for round trips; they steer diffusers' own sampler, not the network.
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(self.trained_betas))
        if self.beta_schedule in _DIFFUSERS_SCHEDULE_NAMES:  # one name, the one diffusers reads
            object.__setattr__(self, "beta_schedule", _DIFFUSERS_SCHEDULE_NAMES[self.beta_schedule])
        if self.prediction_type != "epsilon":
            raise _unsupported("prediction_type", self.prediction_type, "'epsilon' (the paper's ε_θ)")
        if self.variance_type not in VARIANCE_TYPES:
            raise _unsupported("variance_type", self.variance_type, ", ".join(VARIANCE_TYPES))
        if self.beta_schedule not in BETA_SCHEDULES:
            raise _unsupported("beta_schedule", self.beta_schedule, ", ".join(BETA_SCHEDULES))
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise _unsupported("num_train_timesteps", self.num_train_timesteps, "an int of at least 2")
        if self.trained_betas is not None and (
            len(self.trained_betas) != self.num_train_timesteps
            or not all(0 < b < 1 for b in self.trained_betas)
        ):
            raise _unsupported("trained_betas", self.trained_betas, "num_train_timesteps values in (0, 1)")
        if self.trained_betas is None and self.beta_schedule in ("linear", "scaled_linear"):
            for key in ("beta_start", "beta_end"):
                if not 0 < getattr(self, key) < 1:
                    raise _unsupported(key, getattr(self, key), "a value in (0, 1)")
        # What diffusers' samplers do with these, this service's would not: refused, not ignored.
        if self.thresholding:
            raise _unsupported("thresholding", True, "false (x̂₀ is clipped to [-1, 1], as in the paper)")
        if self.rescale_betas_zero_snr:
            raise _unsupported("rescale_betas_zero_snr", True, "false (the schedule as given, ᾱ_T > 0)")
        if self.clip_sample and self.clip_sample_range != 1.0:
            raise _unsupported(
                "clip_sample_range", self.clip_sample_range, "1.0 (x̂₀ is clipped to [-1, 1], as in the paper)"
            )

    @classmethod
    def diffusers_defaults(cls) -> dict[str, Any]:
        """The value diffusers' DDPMScheduler gives each key a scheduler_config.json leaves out."""
        return {f.name: f.default for f in dataclasses.fields(cls)} | {"variance_type": "fixed_small"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulerConfig:
        """From a diffusers scheduler_config.json dict, like `UNetConfig.from_dict`; the keys of older
        diffusers are read as it read them (`predict_epsilon`) or dropped where inert (`tensor_format`)."""
        d, note = _legacy_scheduler_keys(d)
        try:
            return cls(**_merge(d, cls.diffusers_defaults(), "DDPMScheduler", _INERT_SCHEDULER_KEYS))
        except CheckpointError as e:
            if note and "'prediction_type'" in str(e):
                raise CheckpointError(f"{e} ({note})") from None
            raise

    def to_dict(self) -> dict[str, Any]:
        """A scheduler_config.json dict that diffusers' `DDPMScheduler.from_config` accepts."""
        return _as_json(self, "DDPMScheduler")
