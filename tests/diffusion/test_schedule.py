import math
import warnings

import numpy as np
import pytest
import torch

from app.diffusion import Schedule, Variance, alpha_bar, extract, make_betas

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers import DDPMScheduler

T = 1000


@pytest.fixture(scope="module")
def schedule() -> Schedule:
    return Schedule.from_config("linear", T)


def test_linear_betas_are_the_papers_linspace_bit_for_bit():
    betas = make_betas("linear", T)
    assert betas.dtype == torch.float64
    np.testing.assert_array_equal(betas.numpy(), np.linspace(1e-4, 0.02, T, dtype=np.float64))


def test_scaled_linear_betas_are_squared_linspace_of_roots():
    betas = make_betas("scaled_linear", T, 0.00085, 0.012)
    np.testing.assert_array_equal(betas.numpy(), np.linspace(0.00085**0.5, 0.012**0.5, T) ** 2)
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).betas
    np.testing.assert_allclose(betas.numpy(), reference.double().numpy(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "squaredcos_cap_v2"])
def test_cosine_betas_equal_diffusers(kind):
    betas = make_betas(kind, T)
    reference = DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas
    # diffusers computes the same Python floats and stores them as float32.
    torch.testing.assert_close(betas.float(), reference, rtol=0, atol=0)
    assert betas[-1].item() == 0.999  # the max_beta cap of Nichol & Dhariwal


def test_tables_match_diffusers_ddpm_scheduler(schedule):
    reference = DDPMScheduler(beta_schedule="linear", variance_type="fixed_small")
    # diffusers accumulates ᾱ in float32; 1000 products lose about 1e-5 relative.
    np.testing.assert_allclose(
        schedule.alphas_cumprod.numpy(), reference.alphas_cumprod.double().numpy(), rtol=2e-5
    )
    for t in (1, 10, 500, 999):
        small = reference._get_variance(t).item()
        large = reference._get_variance(t, variance_type="fixed_large").item()
        # diffusers forms β_t = 1 − ᾱ_t/ᾱ_{t−1} in float32: an absolute error of a few 1e-8.
        assert schedule.posterior_variance[t].item() == pytest.approx(small, rel=0, abs=2e-7)
        assert schedule.betas[t].item() == pytest.approx(large, rel=0, abs=2e-7)


def test_posterior_tables_follow_eq7_and_the_original_clipping(schedule):
    pv = schedule.posterior_variance
    assert pv[0].item() == 0.0  # q(x_0 | x_1, x_0) is a point
    assert schedule.posterior_log_variance_clipped[0].item() == math.log(pv[1].item())
    torch.testing.assert_close(schedule.posterior_log_variance_clipped[1:], pv[1:].log())
    assert schedule.alphas_cumprod_prev[0].item() == 1.0
    torch.testing.assert_close(schedule.alphas_cumprod_prev[1:], schedule.alphas_cumprod[:-1])


def test_model_log_variance_follows_the_original_code(schedule):
    beta = schedule.model_log_variance(Variance.BETA)
    assert beta[0].item() == math.log(schedule.posterior_variance[1].item())
    torch.testing.assert_close(beta[1:], schedule.betas[1:].log())
    assert schedule.model_log_variance("posterior") is schedule.posterior_log_variance_clipped


def test_unknown_kind_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"linear.*scaled_linear.*cosine"):
        make_betas("quadratic", T)


@pytest.mark.parametrize(
    "betas",
    [[0.0, 0.5], [0.5, 1.0], [-0.1, 0.2], [[0.1, 0.2]], [0.1]],
    ids=["zero", "one", "neg", "2d", "short"],
)
def test_schedule_rejects_bad_betas(betas):
    with pytest.raises(ValueError):
        Schedule(torch.tensor(betas))


def test_variance_from_diffusers():
    assert Variance.from_diffusers("fixed_large") is Variance.BETA
    assert Variance.from_diffusers("fixed_large_log") is Variance.BETA
    assert Variance.from_diffusers("fixed_small") is Variance.POSTERIOR
    assert Variance.from_diffusers("fixed_small_log") is Variance.POSTERIOR
    with pytest.raises(ValueError, match="learned_range"):
        Variance.from_diffusers("learned_range")


def test_extract_gathers_per_row_and_broadcasts(schedule):
    t = torch.tensor([0, 999, 5])
    out = extract(schedule.betas, t, (3, 2, 4, 4))
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), schedule.betas[t].float())
    assert extract(schedule.betas, t, (3, 2), dtype=torch.float64).dtype == torch.float64


def test_alpha_bar_is_one_before_the_chain(schedule):
    out = alpha_bar(schedule, torch.tensor([-1, 0, 999]))
    assert out.dtype == torch.float64
    assert out.tolist() == [1.0, schedule.alphas_cumprod[0].item(), schedule.alphas_cumprod[999].item()]


def test_to_copies_every_table(schedule):
    moved = schedule.to("cpu")
    assert moved is not schedule and moved.num_timesteps == T
    for name in (
        "betas",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_log_variance_clipped",
        "posterior_mean_coef2",
    ):
        assert getattr(moved, name).dtype == torch.float64
        torch.testing.assert_close(getattr(moved, name), getattr(schedule, name), rtol=0, atol=0)
