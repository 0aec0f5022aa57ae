import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from app.diffusion import (
    Schedule,
    Variance,
    calc_bpd_loop,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    q_sample,
    vb_terms_bpd,
)

T = 1000
BIN_CENTRES = torch.linspace(-1, 1, 256, dtype=torch.float64)  # −1 + 2k/255


@pytest.fixture(scope="module")
def schedule() -> Schedule:
    return Schedule.from_config("linear", T)


@pytest.mark.parametrize(
    ("m1", "v1", "m2", "v2"), [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -1.0, 2.0), (2.0, 0.01, 1.5, 0.3)]
)
def test_normal_kl_matches_numerical_integration(m1, v1, m2, v2):
    p, q = stats.norm(m1, v1**0.5), stats.norm(m2, v2**0.5)
    lo, hi = m1 - 12 * v1**0.5, m1 + 12 * v1**0.5
    reference, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi, epsabs=1e-12)
    kl = normal_kl(torch.tensor(m1, dtype=torch.float64), math.log(v1), m2, math.log(v2))
    assert kl.item() == pytest.approx(reference, rel=1e-6, abs=1e-10)


@pytest.mark.parametrize(("mean", "scale"), [(0.0, 0.1), (0.5, 0.02), (-0.99, 0.3), (1.0, 0.001), (0.3, 5.0)])
def test_decoder_probabilities_sum_to_one_over_the_256_bins(mean, scale):
    log_p = discretized_gaussian_log_likelihood(
        BIN_CENTRES,
        means=torch.full_like(BIN_CENTRES, mean),
        log_scales=torch.full_like(BIN_CENTRES, math.log(scale)),
    )
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_decoder_interior_bin_is_a_normal_cdf_difference():
    x, mean, scale = BIN_CENTRES[140].item(), BIN_CENTRES[140].item() + 0.004, 0.01
    log_p = discretized_gaussian_log_likelihood(
        torch.tensor([x], dtype=torch.float64),
        means=torch.tensor([mean], dtype=torch.float64),
        log_scales=torch.tensor([math.log(scale)], dtype=torch.float64),
    )
    reference = stats.norm.cdf(x + 1 / 255, mean, scale) - stats.norm.cdf(x - 1 / 255, mean, scale)
    # The original's tanh approximation of Φ is off by at most 1.8e-4.
    assert log_p.exp().item() == pytest.approx(reference, abs=4e-4)
    assert reference > 0.1  # a bin that matters, not the 1e-12 floor


def test_prior_bpd_is_the_kl_to_a_standard_normal(schedule):
    x0 = torch.tensor([[-1.0, 0.0, 1.0, 0.5], [0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))[-1]
    mean, var = np.sqrt(abar) * x0.numpy(), 1.0 - abar
    reference = (0.5 * (-1.0 - np.log(var) + var + mean**2)).mean(axis=1) / np.log(2.0)
    np.testing.assert_allclose(prior_bpd(schedule, x0).numpy(), reference, rtol=1e-10)
    assert prior_bpd(schedule, x0).max() < 1e-4  # ᾱ_T ≈ 4e-5: x_T is almost pure noise


def _point_data(seed: int = 0) -> torch.Tensor:
    # Pixels on bin centres, including both edge bins.
    k = torch.randint(0, 256, (2, 1, 4, 4), generator=torch.Generator().manual_seed(seed))
    k[0, 0, 0, 0], k[1, 0, 0, 0] = 0, 255
    return BIN_CENTRES[k]


def _noise_fn(shape):
    gen = torch.Generator().manual_seed(7)
    noises = torch.randn(T, *shape, generator=gen, dtype=torch.float64)
    return lambda t: noises[t]


def _optimal_model(s: Schedule, x0: torch.Tensor):
    # For data that is the single point x0, the optimal ε is exactly the noise that produced x_t.
    def model(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = s.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (xt - abar.sqrt() * x0) / (1 - abar).sqrt()

    return model


def test_bound_of_the_optimal_model_for_point_data(schedule):
    x0 = _point_data()
    result = calc_bpd_loop(
        _optimal_model(schedule, x0), x0, schedule, variance=Variance.POSTERIOR, noise_fn=_noise_fn(x0.shape)
    )
    # μ_θ = μ̃ and σ² = β̃: every KL term L_1..L_{T−1} vanishes.
    assert result.terms_bpd[:, 1:].abs().max() < 1e-9
    torch.testing.assert_close(result.total_bpd, result.prior_bpd + result.decoder_bpd)
    assert result.x0_mse.max() < 1e-20
    # L_0: a Gaussian of std √β̃_1 centred on the bin; the bin is ±1/255 wide (one-sided at the edges).
    half_width = (1 / 255) / schedule.posterior_variance[1].sqrt().item()
    interior, edge = stats.norm.cdf(half_width) - stats.norm.cdf(-half_width), stats.norm.cdf(half_width)
    is_edge = (x0.abs() == 1).numpy()
    reference = -np.where(is_edge, np.log2(edge), np.log2(interior)).reshape(2, -1).mean(axis=1)
    np.testing.assert_allclose(result.decoder_bpd.numpy(), reference, rtol=1e-3)
    assert result.decoder_bpd.max() < 1.5


def test_fixed_large_variance_costs_the_gaussian_kl_of_the_variance_mismatch(schedule):
    x0 = _point_data(1)
    result = calc_bpd_loop(
        _optimal_model(schedule, x0), x0, schedule, variance=Variance.BETA, noise_fn=_noise_fn(x0.shape)
    )
    ratio = schedule.posterior_variance[1:] / schedule.betas[1:]
    # Equal means, σ² = β_t against β̃_t: KL = ½(−1 − log(β̃/β) + β̃/β) nats per dimension.
    expected = 0.5 * (-1.0 - ratio.log() + ratio) / math.log(2.0)
    torch.testing.assert_close(result.terms_bpd[:, 1:], expected.expand(2, -1), rtol=1e-6, atol=1e-12)


def test_bound_bookkeeping_with_a_poor_model():
    s = Schedule.from_config("linear", 50)
    x0 = _point_data(2)
    gen = torch.Generator().manual_seed(8)
    noises = torch.randn(50, *x0.shape, generator=gen, dtype=torch.float64)
    seen = []
    result = calc_bpd_loop(
        lambda xt, t: torch.zeros_like(xt),
        x0,
        s,
        variance=Variance.BETA,
        noise_fn=lambda t: noises[t],
        callback=lambda i, t, xt, pred_x0: seen.append((i, t[0].item())),
    )
    assert result.terms_bpd.shape == (2, 50) and result.x0_mse.shape == (2, 50)
    assert seen == [(i, 49 - i) for i in range(50)]
    torch.testing.assert_close(result.total_bpd, result.prior_bpd + result.terms_bpd.sum(1))
    torch.testing.assert_close(result.diffusion_bpd, result.terms_bpd[:, 1:].sum(1))
    assert torch.equal(result.decoder_bpd, result.terms_bpd[:, 0])
    assert (result.terms_bpd[:, 1:] > 0).all() and (result.x0_mse > 0).all()


def test_vb_terms_with_mixed_timesteps_equal_row_by_row(schedule):
    gen = torch.Generator().manual_seed(9)
    x0 = _point_data(3)[[0, 1, 0]]
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 10, 999])
    xt = q_sample(schedule, x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
    bpd, pred_x0 = vb_terms_bpd(schedule, eps, x0, xt, t, variance=Variance.POSTERIOR, clip_denoised=True)
    for i in range(3):
        rows = slice(i, i + 1)
        alone, alone_x0 = vb_terms_bpd(
            schedule, eps[rows], x0[rows], xt[rows], t[rows], variance=Variance.POSTERIOR, clip_denoised=True
        )
        torch.testing.assert_close(bpd[rows], alone)
        torch.testing.assert_close(pred_x0[rows], alone_x0)
    assert bpd.isfinite().all() and (bpd > 0).all()
