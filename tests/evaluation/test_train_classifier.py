import numpy as np
import pytest
import torch

from app.evaluation.train_classifier import ClassifierTraining, random_shift, train_classifier
from app.training.data import SHARED_MNIST, DataError

MNIST = str(SHARED_MNIST)


def test_random_shift_translates_each_image_and_fills_with_background():
    x = torch.full((50, 1, 28, 28), -1.0)
    x[:, :, 10:18, 10:18] = torch.rand(50, 1, 8, 8)
    shifted = random_shift(x, 2, torch.Generator().manual_seed(0))
    offsets = set()
    for a, b in zip(x, shifted, strict=True):
        match = [
            (dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(b, a.roll((dy, dx), (1, 2)))
        ]
        assert len(match) == 1
        offsets.add(match[0])
    assert len(offsets) > 10  # not one shift for the whole batch
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)


def test_training_is_deterministic_and_writes_a_classifier_folder(tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = ClassifierTraining(
            data=MNIST, out=str(tmp_path / name), n_train=256, n_heldout=200, epochs=1, seed=3
        )
        _, record = train_classifier(cfg, command="test")
        runs.append(record)
    a, b = (
        (tmp_path / "a" / "model.safetensors").read_bytes(),
        (tmp_path / "b" / "model.safetensors").read_bytes(),
    )
    assert a == b
    assert runs[0]["heldout_accuracy"] == runs[1]["heldout_accuracy"]
    assert runs[0]["split"] == {"train": "first 256", "heldout": "last 200"}
    assert "CC BY-SA 3.0" in (tmp_path / "a" / "README.md").read_text()


def test_training_refuses_too_few_or_unlabelled_digits(tmp_path):
    images = np.zeros((100, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "few.npz", images=images, labels=np.zeros(100, dtype=np.int64))
    np.savez(tmp_path / "unlabelled.npz", images=images)
    with pytest.raises(DataError, match="fewer than"):
        train_classifier(ClassifierTraining(data=str(tmp_path / "few.npz"), out=str(tmp_path / "o")))
    with pytest.raises(DataError, match="labels"):
        train_classifier(ClassifierTraining(data=str(tmp_path / "unlabelled.npz"), out=str(tmp_path / "o")))
