"""How far one set of samples is from another drawn with the same seeds, e.g. bf16 against float32.

    .venv/bin/python -m bench.precision A.npy B.npy [--classifier models/mnist-classifier] [--name precision]

A and B are `ddpm eval --npy` (or `ddpm sample --npy`) outputs of the same command but for the precision
or fast path (same --seed, --n and --batch-size: `eval` seeds each batch), so image k of both starts from
the same noise; only the shapes can be checked here. Prints the mean and largest absolute pixel
difference (on [−1, 1]), the share of images whose classifier label agrees, and each set's Inception
Score and mean confidence. Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from app.evaluation.classifier import classify, load_classifier
from app.evaluation.cli import DEFAULT_CLASSIFIER
from app.evaluation.metrics import inception_score
from bench.common import save, table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a", help="reference samples (.npy), e.g. float32")
    parser.add_argument("b", help="the same seeds another way (.npy), e.g. bfloat16")
    parser.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER))
    parser.add_argument("--name", default="precision", help="results file name")
    args = parser.parse_args()
    a, b = (torch.from_numpy(np.load(p)).float() for p in (args.a, args.b))
    if a.shape != b.shape:
        raise SystemExit(f"{args.a} holds {tuple(a.shape)} and {args.b} {tuple(b.shape)}: not the same seeds")
    classifier = load_classifier(args.classifier)
    (_, pa), (_, pb) = classify(classifier, a), classify(classifier, b)
    diff = (a - b).abs()
    row = {
        "n": len(a),
        "mean_abs_diff": round(diff.mean().item(), 5),
        "max_abs_diff": round(diff.max().item(), 4),
        "images_over_0.1": int((diff.flatten(1).mean(1) > 0.1).sum()),
        "label_agreement": round((pa.argmax(1) == pb.argmax(1)).float().mean().item(), 4),
        "is_a": round(inception_score(pa.numpy()), 3),
        "is_b": round(inception_score(pb.numpy()), 3),
        "confidence_a": round(pa.max(1).values.mean().item(), 4),
        "confidence_b": round(pb.max(1).values.mean().item(), 4),
    }
    print(table([row], list(row)))
    print(f"wrote {save(args.name, [row], a=args.a, b=args.b)}")


if __name__ == "__main__":
    main()
