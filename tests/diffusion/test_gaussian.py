import numpy as np
import pytest
import torch

from app.diffusion import (
    Schedule,
    Variance,
    p_mean_variance,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
)

T = 1000


@pytest.fixture(scope="module")
def schedule() -> Schedule:
    return Schedule.from_config("linear", T)


def _alphas_cumprod_np() -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))


def test_q_sample_has_the_moments_of_eq4(schedule):
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    t = torch.tensor([10, 300, 900])
    x0 = torch.tensor([0.8, -0.5, 1.0], dtype=torch.float64)[:, None].expand(3, n)
    xt = q_sample(schedule, x0, t, torch.randn(3, n, generator=gen, dtype=torch.float64))
    abar = torch.from_numpy(_alphas_cumprod_np()[t.numpy()])
    expected_mean, expected_var = abar.sqrt() * x0[:, 0], 1.0 - abar
    # 5 standard errors of the sample mean and variance of a Gaussian
    assert torch.all((xt.mean(1) - expected_mean).abs() < 5 * (expected_var / n).sqrt())
    assert torch.all((xt.var(1) - expected_var).abs() < 5 * expected_var * (2 / n) ** 0.5)
    mean, var, log_var = q_mean_variance(schedule, x0, t)
    torch.testing.assert_close(mean[:, 0], expected_mean)
    torch.testing.assert_close(var.flatten(), expected_var)
    torch.testing.assert_close(log_var.flatten(), expected_var.log())


def test_posterior_matches_eq7_written_out_in_numpy(schedule):
    betas = np.linspace(1e-4, 0.02, T)
    abar = _alphas_cumprod_np()
    t = np.array([1, 2, 57, 500, 999])
    abar_prev = abar[t - 1]
    x0 = np.array([0.3, -1.0, 0.9, 0.0, -0.2])
    xt = np.array([-0.7, 0.4, 1.3, 2.0, -1.1])
    mean_np = (
        np.sqrt(abar_prev) * betas[t] / (1 - abar[t]) * x0
        + np.sqrt(1 - betas[t]) * (1 - abar_prev) / (1 - abar[t]) * xt
    )
    var_np = (1 - abar_prev) / (1 - abar[t]) * betas[t]
    mean, var, log_var = q_posterior_mean_variance(
        schedule, torch.from_numpy(x0), torch.from_numpy(xt), torch.from_numpy(t)
    )
    np.testing.assert_allclose(mean.numpy(), mean_np, rtol=1e-12)
    np.testing.assert_allclose(var.flatten().numpy(), var_np, rtol=1e-12)
    np.testing.assert_allclose(log_var.flatten().numpy(), np.log(var_np), rtol=1e-12)


@pytest.mark.parametrize("t", [1, 100, 999])
def test_posterior_is_the_normalised_product_of_the_two_gaussians(schedule, t):
    # q(x_{t−1} | x_t, x_0) ∝ q(x_t | x_{t−1}) q(x_{t−1} | x_0), integrated on a grid.
    x0, xt = 0.3, -0.7
    beta, abar_prev = schedule.betas[t].item(), schedule.alphas_cumprod[t - 1].item()
    grid = np.linspace(-4.0, 4.0, 2_000_001)
    log_density = -((xt - np.sqrt(1 - beta) * grid) ** 2) / (2 * beta) - (
        grid - np.sqrt(abar_prev) * x0
    ) ** 2 / (2 * (1 - abar_prev))
    w = np.exp(log_density - log_density.max())
    mean_num = (grid * w).sum() / w.sum()
    var_num = ((grid - mean_num) ** 2 * w).sum() / w.sum()
    mean, var, _ = q_posterior_mean_variance(
        schedule,
        torch.tensor([x0], dtype=torch.float64),
        torch.tensor([xt], dtype=torch.float64),
        torch.tensor([t]),
    )
    assert mean.item() == pytest.approx(mean_num, rel=1e-6, abs=1e-9)
    assert var.item() == pytest.approx(var_num, rel=1e-4)


def test_posterior_at_the_first_step_is_the_point_x0(schedule):
    x0 = torch.tensor([[0.25, -0.75]], dtype=torch.float64)
    mean, var, _ = q_posterior_mean_variance(
        schedule, x0, torch.tensor([[0.9, -2.0]], dtype=torch.float64), torch.tensor([0])
    )
    torch.testing.assert_close(mean, x0)
    assert var.item() == 0.0


def test_predictions_invert_q_sample(schedule):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 3, 3, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 1, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    xt = q_sample(schedule, x0, t, eps)
    torch.testing.assert_close(predict_x0_from_eps(schedule, xt, t, eps), x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(predict_eps_from_x0(schedule, xt, t, x0), eps, rtol=0, atol=1e-10)


def test_mixed_timesteps_equal_row_by_row(schedule):
    gen = torch.Generator().manual_seed(2)
    x0, xt, eps = (torch.randn(3, 2, 4, 4, generator=gen) for _ in range(3))
    t = torch.tensor([0, 7, 999])
    batch_q = q_sample(schedule, x0, t, eps)
    batch_post = q_posterior_mean_variance(schedule, x0, xt, t)
    batch_p = p_mean_variance(schedule, eps, xt, t, variance=Variance.BETA, clip_denoised=True)
    for i in range(3):
        row = slice(i, i + 1)
        torch.testing.assert_close(batch_q[row], q_sample(schedule, x0[row], t[row], eps[row]))
        for got, want in zip(
            batch_post, q_posterior_mean_variance(schedule, x0[row], xt[row], t[row]), strict=True
        ):
            torch.testing.assert_close(got[row], want)
        alone = p_mean_variance(
            schedule, eps[row], xt[row], t[row], variance=Variance.BETA, clip_denoised=True
        )
        torch.testing.assert_close(batch_p.mean[row], alone.mean)
        torch.testing.assert_close(batch_p.log_variance[row], alone.log_variance)


@pytest.mark.parametrize("variance", list(Variance))
def test_p_mean_variance_uses_the_clipped_x0_and_the_fixed_variance(schedule, variance):
    gen = torch.Generator().manual_seed(3)
    xt = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 5, 999])
    out = p_mean_variance(schedule, eps, xt, t, variance=variance, clip_denoised=True)
    raw = predict_x0_from_eps(schedule, xt, t, eps)
    assert raw.abs().max() > 1  # so clipping has something to do
    torch.testing.assert_close(out.pred_x0, raw.clamp(-1, 1))
    torch.testing.assert_close(out.mean, q_posterior_mean_variance(schedule, raw.clamp(-1, 1), xt, t)[0])
    table = schedule.betas if variance is Variance.BETA else schedule.posterior_variance
    torch.testing.assert_close(out.variance.flatten(), table[t])
    # t = 0 uses log β̃_1 for both choices, as the original code.
    torch.testing.assert_close(out.log_variance.flatten()[0], schedule.posterior_variance[1].log())
    torch.testing.assert_close(out.log_variance.flatten()[1:], table[t[1:]].log())
    unclipped = p_mean_variance(schedule, eps, xt, t, variance=variance, clip_denoised=False)
    torch.testing.assert_close(unclipped.pred_x0, raw)
