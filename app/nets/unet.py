"""The DDPM U-Net (Ho, Jain & Abbeel 2020, Appendix B), with the parameter names of diffusers' `UNet2DModel`.

The network of the original code (`diffusion_tf/models/unet.py`, a PixelCNN++-style U-Net): per resolution,
`num_res_blocks` residual blocks conditioned on a sinusoidal embedding of t, self-attention at the 16×16
level, group normalisation throughout. Module names follow diffusers so that
`UNet(config).load_state_dict(UNet2DModel(**config.to_dict()).state_dict())` works with strict=True.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.nets.config import UNetConfig

__all__ = ["UNet", "UNetConfig", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, *, flip_sin_to_cos: bool, freq_shift: float) -> Tensor:
    """Sinusoidal embedding of t (the original code's `get_timestep_embedding`; Vaswani et al. 2017) with
    diffusers' semantics: [sin, cos] of t·exp(−ln(10⁴)·i/(half − freq_shift)), computed in float32."""
    half = dim // 2
    exponent = (
        -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    )
    args = t.to(torch.float32)[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimeEmbedding(nn.Module):
    """The two dense layers applied to the sinusoidal embedding (original: `temb.dense.{0,1}`)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


def _resblock_args(cfg: UNetConfig) -> dict[str, Any]:
    return dict(
        temb_dim=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout
    )


class ResBlock(nn.Module):
    """The original `resnet_block`: GroupNorm, SiLU, 3×3 conv, + Dense(SiLU(temb)), GroupNorm, SiLU, dropout,
    3×3 conv, a 1×1 shortcut (`nin_shortcut`) where the width changes. diffusers' ResnetBlock2D."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        temb_dim: int,
        groups: int,
        eps: float,
        dropout: float,
        scale: float = 1,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.output_scale_factor = scale

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.conv_shortcut(x) + h) / self.output_scale_factor


class AttnBlock(nn.Module):
    """The original `attn_block`: GroupNorm, then softmax(QKᵀ/√d)V over the H·W positions, projected and
    added back. diffusers' Attention(residual_connection=True, upcast_softmax=True,
    _from_deprecated_attn_block=True)."""

    def __init__(self, channels: int, *, head_dim: int, groups: int, eps: float, scale: float = 1) -> None:
        super().__init__()
        self.heads = channels // head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])
        self.rescale_output_factor = scale

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # (B, H·W, C) through NHWC: a free view when x is channels_last.
        tokens = self.group_norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        q, k, v = (
            proj(tokens).unflatten(-1, (self.heads, -1)).transpose(1, 2).float()
            for proj in (self.to_q, self.to_k, self.to_v)
        )
        a = F.scaled_dot_product_attention(q, k, v).to(x.dtype)  # in float32, like upcast_softmax
        a = self.to_out[1](self.to_out[0](a.transpose(1, 2).reshape(b, h * w, c)))
        return (a.reshape(b, h, w, c).permute(0, 3, 1, 2) + x) / self.rescale_output_factor


class Downsample(nn.Module):
    """Stride-2 3×3 conv; with padding 0 the input is first padded by (0, 1, 0, 1) as in the original code."""

    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)
        self.asymmetric_pad = padding == 0

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric_pad else x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownLevel(nn.Module):
    """One resolution of the contracting path (diffusers' DownBlock2D / AttnDownBlock2D): ResBlocks, each
    followed by attention at attention levels, then a downsample except at the lowest resolution. Every
    output is pushed onto `skips` for the expanding path."""

    def __init__(
        self, c_in: int, c_out: int, *, layers: int, attention: bool, downsample: bool, cfg: UNetConfig
    ):
        super().__init__()
        block = _resblock_args(cfg)
        attn = dict(head_dim=cfg.attention_head_dim or c_out, groups=cfg.norm_num_groups, eps=cfg.norm_eps)
        self.resnets = nn.ModuleList(
            ResBlock(c_in if j == 0 else c_out, c_out, **block) for j in range(layers)
        )
        self.attentions = nn.ModuleList(
            AttnBlock(c_out, **attn) if attention else nn.Identity() for _ in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(c_out, cfg.downsample_padding)] if downsample else [])

    def forward(self, h: Tensor, temb: Tensor, skips: list[Tensor]) -> Tensor:
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            h = attn(resnet(h, temb))
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h


class UpLevel(nn.Module):
    """One resolution of the expanding path (diffusers' UpBlock2D / AttnUpBlock2D): `layers` ResBlocks, each
    taking the concatenation with one popped skip (of width `c_skip` for the last), then an upsample."""

    def __init__(
        self,
        c_prev: int,
        c_out: int,
        c_skip: int,
        *,
        layers: int,
        attention: bool,
        upsample: bool,
        cfg: UNetConfig,
    ):
        super().__init__()
        block = _resblock_args(cfg)
        attn = dict(head_dim=cfg.attention_head_dim or c_out, groups=cfg.norm_num_groups, eps=cfg.norm_eps)
        widths = [
            (c_prev if j == 0 else c_out) + (c_skip if j == layers - 1 else c_out) for j in range(layers)
        ]
        self.resnets = nn.ModuleList(ResBlock(w, c_out, **block) for w in widths)
        self.attentions = nn.ModuleList(
            AttnBlock(c_out, **attn) if attention else nn.Identity() for _ in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(c_out)] if upsample else [])

    def forward(self, h: Tensor, temb: Tensor, skips: list[Tensor]) -> Tensor:
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            h = attn(resnet(torch.cat([h, skips.pop()], dim=1), temb))
        for up in self.upsamplers:
            h = up(h)
        return h


class MidBlock(nn.Module):
    """ResBlock, attention, ResBlock at the lowest resolution (original `mid`; diffusers' UNetMidBlock2D)."""

    def __init__(self, channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        scale = cfg.mid_block_scale_factor
        block = _resblock_args(cfg)
        self.resnets = nn.ModuleList(ResBlock(channels, channels, **block, scale=scale) for _ in range(2))
        attn = AttnBlock(
            channels,
            head_dim=cfg.attention_head_dim or channels,
            groups=cfg.attn_norm_num_groups or cfg.norm_num_groups,
            eps=cfg.norm_eps,
            scale=scale,
        )
        self.attentions = nn.ModuleList([attn if cfg.add_attention else nn.Identity()])

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](h, temb)), temb)


class UNet(nn.Module):
    """ε_θ(x_t, t) of the paper (Section 3.2): the noise predicted in x_t at timestep t."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.block_out_channels
        last = len(ch) - 1
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimeEmbedding(ch[0], config.time_embed_dim)
        self.down_blocks = nn.ModuleList(
            DownLevel(
                ch[max(i - 1, 0)],
                ch[i],
                layers=config.layers_per_block,
                attention=kind == "AttnDownBlock2D",
                downsample=i < last,
                cfg=config,
            )
            for i, kind in enumerate(config.down_block_types)
        )
        self.mid_block = MidBlock(ch[-1], config)
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList(
            UpLevel(
                rev[max(i - 1, 0)],
                rev[i],
                rev[min(i + 1, last)],
                layers=config.layers_per_block + 1,
                attention=kind == "AttnUpBlock2D",
                upsample=i < last,
                cfg=config,
            )
            for i, kind in enumerate(config.up_block_types)
        )
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """ε for a batch x of shape (B, C, H, W) at timesteps t: a (B,) tensor of any numeric dtype, one t per
        row, or a scalar for every row."""
        cfg = self.config
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = timestep_embedding(
            t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        )
        temb = self.time_embedding(emb.to(self.conv_in.weight.dtype))
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            h = level(h, temb, skips)
        h = self.mid_block(h, temb)
        for level in self.up_blocks:
            h = level(h, temb, skips)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
