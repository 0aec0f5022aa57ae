"""A small MNIST CNN whose softmax gives IS and whose 128-d penultimate layer gives FID features.

It plays the part of the Inception network in Salimans et al. 2016 and Heusel et al. 2017.
Inputs are model-space images (N, 1, 28, 28) in [-1, 1]; 32×32 images (a DDPM trained on MNIST
padded to 32) are center-cropped back to 28×28. A classifier is stored as a folder:
`config.json` (architecture and training record), `model.safetensors` and a `README.md` card.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"


@dataclass(frozen=True)
class ClassifierConfig:
    channels: tuple[int, int, int] = (32, 64, 128)
    feature_dim: int = 128
    num_classes: int = 10
    image_size: int = 28
    dropout: float = 0.3


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitClassifier(nn.Module):
    """conv32 – pool – conv64 – pool – conv128 – pool – fc128 (features) – ReLU – fc10 (logits).

    Pooling after every conv keeps it cheap on a CPU (≈7.5 M multiply-adds a digit).
    """

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ClassifierConfig()
        c1, c2, c3 = config.channels
        self.body = nn.Sequential(
            *_conv(1, c1),
            nn.MaxPool2d(2),  # 28 -> 14
            *_conv(c1, c2),
            nn.MaxPool2d(2),  # 14 -> 7
            *_conv(c2, c3),
            nn.MaxPool2d(2),  # 7 -> 3
            nn.Flatten(),
            nn.Dropout(config.dropout),
            nn.Linear(c3 * 9, config.feature_dim),
        )
        # Features are taken before this ReLU: no dead (always-zero) units, so their covariance
        # has full rank and FID's Gaussian fit and matrix square root are well posed.
        self.head = nn.Sequential(
            nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(config.feature_dim, config.num_classes)
        )

    def crop(self, x: Tensor) -> Tensor:
        """Check the shape and center-crop 32×32 (or any larger square) inputs to the trained size."""
        size = self.config.image_size
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-1] != x.shape[-2] or x.shape[-1] < size:
            raise ValueError(f"expected (N, 1, H, H) digits with H ≥ {size}, got {tuple(x.shape)}")
        if (x.shape[-1] - size) % 2:
            raise ValueError(f"cannot center-crop {x.shape[-1]}×{x.shape[-1]} to {size}×{size}")
        m = (x.shape[-1] - size) // 2
        return x[..., m : m + size, m : m + size] if m else x

    def features(self, x: Tensor) -> Tensor:
        """(N, 1, 28|32, 28|32) in [-1, 1] -> (N, feature_dim) penultimate activations (pre-ReLU)."""
        return self.body(self.crop(x))

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1, 28|32, 28|32) in [-1, 1] -> (N, num_classes) logits."""
        return self.head(self.features(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def save_classifier(
    model: DigitClassifier, path: str | Path, *, record: dict[str, Any] | None = None, card: str | None = None
) -> Path:
    """Write `config.json` (architecture + training `record`), `model.safetensors` and `README.md`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"architecture": type(model).__name__, **dataclasses.asdict(model.config), **(record or {})}
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_NAME))
    if card is not None:
        (path / CARD_NAME).write_text(card)
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """The whole `config.json` of a saved classifier, training record (e.g. heldout_accuracy) included."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not a classifier folder (no {CONFIG_NAME})")
    return json.loads(file.read_text())


def load_classifier(path: str | Path, *, device: str | torch.device = "cpu") -> DigitClassifier:
    """Load a saved classifier in eval mode (dropout off, batch-norm running statistics)."""
    raw = read_config(path)
    fields = {f.name for f in dataclasses.fields(ClassifierConfig)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields}
    model = DigitClassifier(ClassifierConfig(**kwargs))
    model.load_state_dict(load_file(str(Path(path) / WEIGHTS_NAME)))
    return model.to(device).eval()


@torch.no_grad()
def classify(model: DigitClassifier, images: Tensor, *, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Run `model` over `images` in batches -> (features (N, D), class probabilities (N, K)) on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, probs = [], []
    for batch in images.split(batch_size):
        f = model.features(batch.to(device, torch.float32))
        feats.append(f.float().cpu())
        probs.append(model.head(f).float().softmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(feats), torch.cat(probs)
