import numpy as np
import pytest
import torch

from app.evaluation.metrics import (
    class_histogram,
    frechet_distance,
    gaussian_stats,
    inception_score,
    nearest_distances,
)


def _random_probs(n: int, k: int, seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(scale=3.0, size=(n, k))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _random_gaussian(d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T / d + 0.1 * np.eye(d)


def test_is_of_confident_uniform_predictions_is_the_number_of_classes():
    probs = np.eye(10)[np.arange(1000) % 10]
    assert inception_score(probs) == pytest.approx(10.0, abs=1e-9)


def test_is_of_one_class_is_one():
    assert inception_score(np.eye(10)[np.full(500, 3)]) == pytest.approx(1.0, abs=1e-12)
    same_soft = np.tile(_random_probs(1, 10, 0), (200, 1))  # confident or not, no diversity
    assert inception_score(same_soft) == pytest.approx(1.0, abs=1e-9)


def test_is_matches_the_formula_on_random_probabilities():
    p = _random_probs(600, 10, 1)
    p_y = p.mean(axis=0)
    expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p_y)), axis=1)))
    assert inception_score(torch.from_numpy(p).float()) == pytest.approx(expected, rel=1e-5)
    assert inception_score(p) == pytest.approx(expected, rel=1e-12)
    assert 1.0 < expected < 10.0


def test_is_with_splits_is_the_mean_over_splits():
    p = _random_probs(300, 10, 2)
    parts = [inception_score(p[i : i + 100]) for i in (0, 100, 200)]
    assert inception_score(p, splits=3) == pytest.approx(np.mean(parts), rel=1e-12)


def test_fid_of_identical_statistics_is_zero():
    mu, sigma = _random_gaussian(64, 3)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


@pytest.mark.parametrize(
    ("m1", "v1", "m2", "v2"), [(1.0, 4.0, -0.5, 0.25), (0.0, 1.0, 0.0, 9.0), (2.0, 1.0, 2.0, 1.0)]
)
def test_fid_of_1d_gaussians_is_the_closed_form(m1, v1, m2, v2):
    expected = (m1 - m2) ** 2 + v1 + v2 - 2 * np.sqrt(v1 * v2)
    got = frechet_distance(np.array([m1]), np.array([[v1]]), np.array([m2]), np.array([[v2]]))
    assert got == pytest.approx(expected, abs=1e-9)


def test_fid_of_diagonal_gaussians_sums_the_closed_form_over_dimensions():
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)  # standard deviations
    expected = np.sum((mu1 - mu2) ** 2 + s1**2 + s2**2 - 2 * s1 * s2)
    assert frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(expected, rel=1e-9)


def test_fid_of_full_covariances_matches_the_eigenvalue_form_and_is_symmetric():
    (mu1, s1), (mu2, s2) = _random_gaussian(32, 5), _random_gaussian(32, 6)
    # Tr (Σ1 Σ2)^½ = Σ √λ_i, the eigenvalues of Σ1 Σ2 being real and positive
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    d12, d21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert d12 == pytest.approx(expected, rel=1e-8)
    assert d12 == pytest.approx(d21, rel=1e-8)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_fid_survives_singular_covariances():
    rng = np.random.default_rng(7)
    f1, f2 = rng.normal(size=(50, 16)), rng.normal(size=(50, 16))
    f1[:, :4] = 0.0  # dead ReLU units: zero rows and columns in Σ1
    (mu1, s1), (mu2, s2) = gaussian_stats(f1), gaussian_stats(f2)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_gaussian_stats_are_float64_mean_and_covariance():
    f = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    mu, sigma = gaussian_stats(f)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (5, 5)
    np.testing.assert_allclose(mu, f.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.double().numpy(), rowvar=False), rtol=1e-12)


def test_class_histogram_counts_argmax_classes():
    probs = np.eye(10)[[0, 0, 3, 9, 9, 9]] * 0.6 + 0.04
    assert class_histogram(probs).tolist() == [2, 0, 0, 1, 0, 0, 0, 0, 0, 3]


def test_nearest_distances_are_the_brute_force_minimum_over_chunks():
    g = torch.Generator().manual_seed(0)
    images, reference = torch.randn(7, 1, 4, 4, generator=g), torch.randn(11, 1, 4, 4, generator=g)
    expected = np.array([min(float((x.double() - r.double()).norm()) for r in reference) for x in images])
    np.testing.assert_allclose(nearest_distances(images, reference, chunk=3), expected, rtol=1e-9)


def test_nearest_distances_find_copies_and_skip_an_images_own_row():
    reference = torch.tensor([0.0, 1.0, 3.0, 7.0]).view(4, 1, 1, 1)
    copies = reference[[2, 0]]
    assert nearest_distances(copies, reference).tolist() == [0.0, 0.0]
    # leave-one-out: 3 matches 1 (distance 2) once its own row is skipped, 0 matches 1
    assert nearest_distances(copies, reference, skip=torch.tensor([2, 0]), chunk=1).tolist() == [2.0, 1.0]


def test_nearest_distances_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        nearest_distances(torch.zeros(2, 1, 28, 28), torch.zeros(3, 1, 32, 32))
    with pytest.raises(ValueError, match="skip has 1 entries for 2 images"):
        nearest_distances(torch.zeros(2, 1, 2, 2), torch.zeros(3, 1, 2, 2), skip=torch.tensor([0]))
