"""Inception Score (Salimans et al. 2016) and FID (Heusel et al. 2017) on a classifier's outputs.

The maths are pure functions of class probabilities and features (tensors or arrays, computed in
float64); `evaluate` and `evaluate_real` run the classifier in batches and assemble a report.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from scipy.special import rel_entr

from app.evaluation.classifier import DigitClassifier, classify

ArrayLike = np.ndarray | torch.Tensor


def _f64(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def inception_score(probs: ArrayLike, splits: int = 1) -> float:
    """IS = exp(E_x KL(p(y|x) ‖ p(y))), p(y) the mean over the split; the mean over `splits` splits.

    Ranges from 1 (every x gets the same p(y|x)) to K (confident and uniform over K classes).
    """
    p = _f64(probs)
    if p.ndim != 2 or len(p) < splits:
        raise ValueError(f"expected (N, K) probabilities with N ≥ splits={splits}, got {p.shape}")
    scores = []
    for part in np.array_split(p, splits):
        p_y = part.mean(axis=0, keepdims=True)
        kl = rel_entr(part, p_y).sum(axis=1)  # 0 log 0 = 0, so one-hot rows are fine
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def gaussian_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, float64; the Gaussian FID fits."""
    f = _f64(features)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"expected (N, D) features with N ≥ 2, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6
) -> float:
    """d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), as in pytorch-fid's `calculate_frechet_distance`.

    When Σ1 Σ2 is near-singular the square root is taken of (Σ1 + εI)(Σ2 + εI); a negligible
    imaginary part from rounding is dropped, a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(_f64(mu1)), np.atleast_1d(_f64(mu2))
    sigma1, sigma2 = np.atleast_2d(_f64(sigma1)), np.atleast_2d(_f64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: {mu1.shape}, {sigma1.shape} vs {mu2.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag)):.3g} in (Σ1 Σ2)^½")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def class_histogram(probs: ArrayLike) -> np.ndarray:
    """How many samples the classifier assigns (argmax) to each class: (K,) int64."""
    p = _f64(probs)
    return np.bincount(p.argmax(axis=1), minlength=p.shape[1]).astype(np.int64)


def nearest_distances(
    images: torch.Tensor, reference: torch.Tensor, *, skip: torch.Tensor | None = None, chunk: int = 512
) -> np.ndarray:
    """For each image, the L2 pixel distance to its nearest image in `reference`: (N,) float64.

    A memorization check: samples that copy training images sit much nearer to them than real images
    sit to each other. `skip[i]` names a reference row that image i may not match (itself, when the
    images are drawn from the reference), for the real-vs-real baseline.
    """
    if images.shape[1:] != reference.shape[1:]:
        shapes = tuple(images.shape[1:]), tuple(reference.shape[1:])
        raise ValueError(f"images {shapes[0]} and reference {shapes[1]} differ")
    if skip is not None and len(skip) != len(images):
        raise ValueError(f"skip has {len(skip)} entries for {len(images)} images")
    ref = reference.flatten(1).double()
    out = []
    for start in range(0, len(images), chunk):
        d = torch.cdist(images[start : start + chunk].flatten(1).double(), ref)
        if skip is not None:
            rows = torch.arange(len(d))
            d[rows, skip[start : start + chunk]] = float("inf")
        out.append(d.min(dim=1).values)
    return torch.cat(out).numpy()


def evaluate(
    images: torch.Tensor,
    classifier: DigitClassifier,
    reference_stats: tuple[np.ndarray, np.ndarray],
    *,
    reference_images: torch.Tensor | None = None,
    batch_size: int = 500,
    splits: int = 1,
) -> dict:
    """IS, FID against `reference_stats` (μ, Σ of real features), class counts and mean confidence;
    with `reference_images` also the median distance from a sample to its nearest real image."""
    features, probs = classify(classifier, images, batch_size=batch_size)
    mu, sigma = gaussian_stats(features)
    report = {
        "n": len(images),
        "is": inception_score(probs, splits=splits),
        "fid": frechet_distance(mu, sigma, *reference_stats),
        "class_counts": class_histogram(probs).tolist(),
        "mean_confidence": float(probs.max(dim=1).values.double().mean()),
    }
    if reference_images is not None:
        crop = classifier.crop
        report["nn_distance"] = float(np.median(nearest_distances(crop(images), crop(reference_images))))
    return report


def evaluate_real(
    images: torch.Tensor,
    classifier: DigitClassifier,
    *,
    subset: int | None = None,
    batch_size: int = 500,
    splits: int = 1,
) -> dict:
    """The real-data row: IS of all `images` and the FID floor between two disjoint halves.

    The halves are the even- and odd-indexed digits, so each holds the same share of any part of
    the set (e.g. of the digits the classifier was trained on). FID is biased upwards for small
    samples, so `subset` also gives the floor for that many odd digits against the even half
    (`fid_subset`): the fair floor for an `eval` of `subset` samples. The same odd digits give the
    baseline of `nn_distance`: the median distance from a real digit to its nearest other digit.
    """
    features, probs = classify(classifier, images, batch_size=batch_size)
    even, odd = features[0::2], features[1::2]
    even_stats = gaussian_stats(even)
    report = {
        "n": len(images),
        "is": inception_score(probs, splits=splits),
        "fid": frechet_distance(*gaussian_stats(odd), *even_stats),
        "fid_halves": [len(odd), len(even)],
        "class_counts": class_histogram(probs).tolist(),
        "mean_confidence": float(probs.max(dim=1).values.double().mean()),
    }
    if subset is not None:
        if not 2 <= subset <= len(odd):
            raise ValueError(f"subset must be in 2..{len(odd)}, got {subset}")
        report["fid_subset"] = frechet_distance(*gaussian_stats(odd[:subset]), *even_stats)
        report["subset"] = subset
        own = torch.arange(1, 2 * subset, 2)  # the odd digits' own rows, which they may not match
        pixels = classifier.crop(images)
        report["nn_distance"] = float(np.median(nearest_distances(pixels[own], pixels, skip=own)))
    return report
