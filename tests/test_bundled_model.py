"""The model the service ships, end to end on the CPU: its samples read as digits to the classifier."""

import json

from app.cli import BUNDLED_MODEL
from app.evaluation.classifier import classify, load_classifier
from app.evaluation.metrics import inception_score
from app.nets import resolve_model
from app.sampling import generate

CLASSIFIER = BUNDLED_MODEL.parent / "mnist-classifier"


def test_bundled_model_card_and_layout():
    ckpt = resolve_model(str(BUNDLED_MODEL))
    assert (ckpt.name, ckpt.resolution, ckpt.channels) == ("mnist", 28, 1)
    assert (BUNDLED_MODEL / "diffusion_pytorch_model.safetensors").stat().st_size < 20 * 2**20
    card = (BUNDLED_MODEL / "README.md").read_text()
    assert "CC BY-SA 3.0" in card and "ddpm train" in card
    record = json.loads((BUNDLED_MODEL / "training.json").read_text())
    assert record["step"] > 0
    total = record.get("total_step", record["step"])
    assert f"{total:,} steps" in card, "the card's step count is not the shipped weights'"


def test_bundled_model_samples_read_as_digits():
    """64 DDIM-20 samples: confident classifications, every digit class present.

    The bars sit below what the shipped weights give (mean confidence 0.955, all 10 classes, IS 8.54
    at step 18,128; 0.956 and IS 8.25 at step 13,527; 0.930 and IS 7.93 at step 3,797, 0.81 and 5.38
    at step 1,439); raise them as the model trains on."""
    ckpt = resolve_model(str(BUNDLED_MODEL))
    images = generate(ckpt, n=64, steps=20, sampler="ddim", seed=0).images
    _, probs = classify(load_classifier(CLASSIFIER), images)
    confidence = probs.max(1).values
    classes = set(probs.argmax(1).tolist())
    assert confidence.mean() >= 0.90, f"mean classifier confidence {confidence.mean():.3f}"
    assert len(classes) == 10, f"classes present: {sorted(classes)}"
    assert inception_score(probs.numpy()) >= 7.5
