"""The paper's five models (Ho et al. 2020, Appendix B) as named presets: architecture, forward process and
the diffusers hub repository holding the authors' weights."""

from __future__ import annotations

from dataclasses import dataclass

from app.nets.config import SchedulerConfig, UNetConfig


@dataclass(frozen=True)
class Preset:
    name: str
    unet: UNetConfig
    scheduler: SchedulerConfig  # T = 1000, β linear 1e-4 → 0.02
    hub_repo: str
    description: str


# 256×256: ch_mult (1, 1, 2, 2, 4, 4), attention at 16×16, no dropout, σ²_t = β̃_t (114M parameters).
_LARGE = UNetConfig.ddpm(resolution=256, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0)
_FIXED_SMALL = SchedulerConfig(variance_type="fixed_small")


def _large(name: str, dataset: str) -> Preset:
    return Preset(
        name, _LARGE, _FIXED_SMALL, f"google/ddpm-{name}-256", f"{dataset} 256×256, 114M parameters"
    )


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "cifar10",
            UNetConfig.ddpm(resolution=32, ch_mult=(1, 2, 2, 2), dropout=0.1),
            SchedulerConfig(variance_type="fixed_large"),  # σ²_t = β_t
            "google/ddpm-cifar10-32",
            "CIFAR10 32×32, 35.7M parameters (FID 3.17, IS 9.46 in Table 1)",
        ),
        _large("celebahq", "CelebA-HQ"),
        _large("church", "LSUN Church"),
        _large("bedroom", "LSUN Bedroom"),
        _large("cat", "LSUN Cat"),
    )
}
