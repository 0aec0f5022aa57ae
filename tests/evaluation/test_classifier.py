"""The shipped classifier (models/mnist-classifier) and the IS/FID it gives on real digits."""

from pathlib import Path

import numpy as np
import pytest
import torch

from app.evaluation.classifier import DigitClassifier, classify, load_classifier, read_config, save_classifier
from app.evaluation.metrics import (
    class_histogram,
    evaluate,
    frechet_distance,
    gaussian_stats,
    inception_score,
)
from app.training.data import SHARED_MNIST, load_images, pad_to

MNIST = str(SHARED_MNIST)
SHIPPED = Path(__file__).resolve().parents[2] / "models" / "mnist-classifier"


@pytest.fixture(scope="module")
def digits():
    return load_images(MNIST, with_labels=True)


@pytest.fixture(scope="module")
def shipped():
    return load_classifier(SHIPPED)


@pytest.fixture(scope="module")
def outputs(digits, shipped):
    """Features and probabilities of all 10,000 real digits (one pass, shared by the tests)."""
    return classify(shipped, digits[0])


def test_shipped_classifier_is_small_and_records_its_heldout_accuracy():
    config = read_config(SHIPPED)
    assert (SHIPPED / "model.safetensors").stat().st_size < 2_000_000
    assert 0.985 <= config["heldout_accuracy"] <= 1.0
    assert config["split"]["heldout"] == "last 2000"
    card = (SHIPPED / "README.md").read_text()
    assert f"{config['heldout_accuracy']:.2%}" in card and "CC BY-SA 3.0" in card


def test_shipped_classifier_reaches_its_recorded_heldout_accuracy(digits, outputs):
    _, labels = digits
    _, probs = outputs
    correct = int((probs[-2000:].argmax(1) == labels[-2000:]).sum())
    assert correct / 2000 >= read_config(SHIPPED)["heldout_accuracy"]


def test_class_histogram_of_real_digits_covers_all_classes_like_the_labels(digits, outputs):
    counts = class_histogram(outputs[1])
    assert (counts > 0).all()
    np.testing.assert_allclose(counts, digits[1].bincount().numpy(), atol=30)  # ≤ 3% off per class


def test_real_digits_score_near_the_is_maximum(outputs):
    assert inception_score(outputs[1][-2000:]) > 9.0  # held-out digits only: never trained on


def test_real_vs_real_fid_is_small_next_to_real_vs_noise(digits, shipped, outputs):
    features = outputs[0]
    real_a, real_b = gaussian_stats(features[0::2]), gaussian_stats(features[1::2])
    floor = frechet_distance(*real_a, *real_b)
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1000, 1, 28, 28, generator=g) * 2 - 1
    blank = -1 + 0.05 * torch.randn(1000, 1, 28, 28, generator=g)  # empty canvases, faintly speckled
    for fake in (noise, blank):
        fake_fid = frechet_distance(*gaussian_stats(classify(shipped, fake)[0]), *real_b)
        assert fake_fid > 100 * floor
    assert 0 < floor < 10.0  # 3.1 for the shipped classifier; ~10⁴ for noise


def test_evaluate_reports_every_figure_and_real_digits_look_real(digits, shipped, outputs):
    reference = gaussian_stats(outputs[0][0::2])
    report = evaluate(digits[0][1::2][:1000], shipped, reference, batch_size=300)
    assert report["n"] == 1000 and len(report["class_counts"]) == 10 and sum(report["class_counts"]) == 1000
    assert report["is"] > 9.0 and report["mean_confidence"] > 0.97 and report["fid"] < 20.0


def test_32px_inputs_are_center_cropped_to_the_same_answer(digits, shipped):
    x = digits[0][:64]
    with torch.no_grad():
        torch.testing.assert_close(shipped(pad_to(x, 32)), shipped(x))
    with pytest.raises(ValueError, match="center-crop"):
        shipped(pad_to(x, 31))
    with pytest.raises(ValueError, match=r"\(N, 1, H, H\)"):
        shipped(x.expand(-1, 3, -1, -1))


def test_save_and_load_round_trip(tmp_path, digits):
    torch.manual_seed(0)
    model = DigitClassifier().eval()
    save_classifier(model, tmp_path / "clf", record={"heldout_accuracy": 0.5}, card="# card\n")
    loaded = load_classifier(tmp_path / "clf")
    assert not loaded.training and read_config(tmp_path / "clf")["heldout_accuracy"] == 0.5
    x = digits[0][:16]
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), model.features(x), rtol=0, atol=0)
    assert 100_000 <= model.num_parameters() <= 300_000
