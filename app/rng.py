"""Per-image random streams: image k of a request depends only on (seed, k), never on batch position."""

from __future__ import annotations

import torch

_MASK = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def image_seed(seed: int, k: int) -> int:
    """A 63-bit seed for image `k` of a request seeded with `seed` (SplitMix64 of both)."""
    return _splitmix64(_splitmix64(seed & _MASK) ^ (k & _MASK)) >> 1


class ImageNoise:
    """One torch.Generator per image; `randn()` stacks one draw per image in a fixed order.

    The streams live on `device`, so the same (seed, k) gives the same images on every run on the
    same kind of device (CPU and CUDA generators differ from each other).
    """

    def __init__(
        self, seed: int, indices: range | list[int], shape: tuple[int, ...], device: torch.device | str
    ):
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.generators = []
        for k in indices:
            g = torch.Generator(device=self.device)
            g.manual_seed(image_seed(seed, k))
            self.generators.append(g)

    def randn(self) -> torch.Tensor:
        """(n, *shape) standard normal: the next draw of each image's stream."""
        return torch.stack(
            [torch.randn(self.shape, generator=g, device=self.device) for g in self.generators]
        )

    def __len__(self) -> int:
        return len(self.generators)
