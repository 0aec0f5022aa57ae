"""Train the evaluation classifier on the first 8,000 MNIST digits; score it on the last 2,000.

The held-out 2,000 are never seen in training, so their accuracy is an honest figure for how far
the classifier's softmax (IS) and features (FID) can be trusted on new digits.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from app.evaluation.classifier import ClassifierConfig, DigitClassifier, classify, save_classifier
from app.training.data import DataError, load_images

LICENCE = "MNIST, CC BY-SA 3.0, Y. LeCun, C. Cortes, C. J. C. Burges"
TRAINING_FIELDS = ("epochs", "batch_size", "lr", "weight_decay", "max_shift", "seed")


@dataclass(frozen=True)
class ClassifierTraining:
    data: str
    out: str
    n_train: int = 8_000
    n_heldout: int = 2_000
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 2
    seed: int = 0
    device: str = "cpu"


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by an integer (dy, dx) in [-max_shift, max_shift], filling with background -1."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, :, None]
    cols = (dx + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def split(data: str | Path, n_train: int, n_heldout: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The first `n_train` labelled digits for training and the last `n_heldout` for scoring."""
    x, y = load_images(data, with_labels=True)
    if y is None:
        raise DataError(f"{data}: the classifier needs labels (an MNIST '*labels-idx*' file)")
    if x.shape[1:] != (1, 28, 28):
        raise DataError(f"{data}: expected 28×28 greyscale digits, got {tuple(x.shape[1:])}")
    if len(x) < n_train + n_heldout:
        raise DataError(f"{data}: {len(x)} digits, fewer than {n_train} train + {n_heldout} held out")
    return x[:n_train], y[:n_train], x[-n_heldout:], y[-n_heldout:]


def accuracy(model: DigitClassifier, x: Tensor, y: Tensor) -> float:
    _, probs = classify(model, x)
    return int((probs.argmax(1) == y).sum()) / len(y)


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1] for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")
        ]
        cpu = names[0].strip() if names else cpu
    return f"{cpu} (CPU, {torch.get_num_threads()} threads)"


def train_classifier(cfg: ClassifierTraining, *, command: str | None = None) -> tuple[DigitClassifier, dict]:
    """Adam with cosine decay and ±`max_shift` px random shifts; writes the classifier folder to `cfg.out`."""
    torch.manual_seed(cfg.seed)  # initialisation and dropout
    generator = torch.Generator().manual_seed(cfg.seed)  # shuffling and shifts
    x_train, y_train, x_held, y_held = split(cfg.data, cfg.n_train, cfg.n_heldout)
    model = DigitClassifier(ClassifierConfig()).to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(x_train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    start = time.perf_counter()
    model.train()
    with tqdm(total=cfg.epochs * steps_per_epoch, desc="classifier", unit="step", dynamic_ncols=True) as bar:
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(x_train), generator=generator)
            for idx in order.split(cfg.batch_size):
                xb = random_shift(x_train[idx], cfg.max_shift, generator).to(cfg.device)
                loss = F.cross_entropy(model(xb), y_train[idx].to(cfg.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
    wall = time.perf_counter() - start
    record = {
        "heldout_accuracy": accuracy(model, x_held, y_held),  # exact: correct / n, no rounding
        "train_accuracy": accuracy(model, x_train, y_train),
        "num_parameters": model.num_parameters(),
        "data": str(cfg.data),
        "split": {"train": f"first {cfg.n_train}", "heldout": f"last {cfg.n_heldout}"},
        "training": {k: getattr(cfg, k) for k in TRAINING_FIELDS},
        "command": command,
        "wall_time_s": round(wall, 1),
        "hardware": hardware(cfg.device),
        "torch": torch.__version__,
    }
    save_classifier(model.eval(), cfg.out, record=record, card=model_card(model, record))
    return model, record


def model_card(model: DigitClassifier, record: dict) -> str:
    c, t = model.config, record["training"]
    c1, c2, c3 = c.channels
    train, held = record["split"]["train"], record["split"]["heldout"]
    return f"""# mnist-classifier

The evaluation network of `ddpm eval`: its softmax gives the Inception Score and its
{c.feature_dim}-d penultimate activations the FID features, in place of the ImageNet Inception
network of the IS/FID papers. Not a generative model; it only scores samples.

## Architecture
`DigitClassifier` (`app/evaluation/classifier.py`), {record["num_parameters"]:,} parameters:
conv3×3 {c1} – maxpool – conv3×3 {c2} – maxpool – conv3×3 {c3} – maxpool to 3×3 (each conv with
batch-norm and ReLU) – dropout {c.dropout} – linear {c3 * 9}→{c.feature_dim} (**features**, taken
before the ReLU so that none is constantly zero) – ReLU – dropout – linear
{c.feature_dim}→{c.num_classes} (**logits**).
Input: (N, 1, {c.image_size}, {c.image_size}) in [-1, 1]; 32×32 inputs are center-cropped by 2 px a side.

## Data and licence
{LICENCE}. The digits of `{record["data"]}`: trained on the
{train}, scored on the {held}, which are never trained on. In the MNIST test set the first
5,000 digits were written by Census Bureau employees and the last 5,000 by students, so the
held-out digits come from the harder half.

## Training
Adam (lr {t["lr"]}, weight decay {t["weight_decay"]}, cosine decay to 0), batch {t["batch_size"]},
{t["epochs"]} epochs, random shifts of ±{t["max_shift"]} px, seed {t["seed"]}.

    {record["command"]}

Wall time {record["wall_time_s"]} s on {record["hardware"]}, torch {record["torch"]}.

## Results
| split | digits | accuracy |
|---|---|---|
| train | {train} | {record["train_accuracy"]:.2%} |
| **held out** (never trained on) | {held} | **{record["heldout_accuracy"]:.2%}** |

`config.json` records the same figures (`heldout_accuracy`); the test suite checks the shipped
weights still reach it.
"""
