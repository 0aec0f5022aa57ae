"""Shared fixtures: small U-Net configs and randomly initialised networks (norm affines included)."""

from collections.abc import Callable

import pytest
import torch

from app.nets.unet import UNet, UNetConfig

# The project's MNIST shape: 28 -> 14 -> 7, attention at 14×14 and 7×7 (the lowest level) and in the middle.
SMALL = UNetConfig.ddpm(
    resolution=28, in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(14, 7)
)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter, so GroupNorm scales/shifts and zero biases matter too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module.eval()


@pytest.fixture
def small_config() -> UNetConfig:
    return SMALL


@pytest.fixture
def random_unet() -> Callable[..., UNet]:
    def make(config: UNetConfig = SMALL, seed: int = 0) -> UNet:
        torch.manual_seed(seed)
        return randomize_(UNet(config), seed)

    return make


@pytest.fixture
def randomize() -> Callable[[torch.nn.Module, int], torch.nn.Module]:
    return randomize_


def rel_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.fixture
def rel_err() -> Callable[[torch.Tensor, torch.Tensor], float]:
    return rel_error


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are small: one intra-op thread is faster than two on a busy two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
