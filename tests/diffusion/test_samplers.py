import warnings

import numpy as np
import pytest
import torch

from app.diffusion import (
    Schedule,
    StepCoefficients,
    Variance,
    ddim_coefficients,
    ddim_plan,
    ddpm_coefficients,
    ddpm_plan,
    denoise_step,
    sample_ddim,
    sample_ddpm,
    timesteps,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm
    from diffusers import DDIMScheduler, DDPMScheduler

T = 1000
SHAPE = (2, 1, 4, 4)


@pytest.fixture(scope="module")
def schedule() -> Schedule:
    return Schedule.from_config("linear", T)


_ABAR = Schedule.from_config("linear", T).alphas_cumprod.float()


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic ε(x, t): the ideal one for data N(0, 0.5²) plus a bounded nonlinear error."""
    abar = _ABAR[t].view(-1, 1, 1, 1)
    ideal = x * (1 - abar).sqrt() / (0.25 * abar + 1 - abar)
    return ideal + 0.1 * torch.tanh(2 * x + t.view(-1, 1, 1, 1) / 500)


def x_T(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _diffusers_timesteps(cls, steps: int) -> list[int]:
    scheduler = cls(num_train_timesteps=T, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.tolist()


def test_timesteps_are_the_trailing_formula_for_every_step_count():
    for steps in range(1, T + 1):
        reference = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
        got = timesteps(T, steps)
        assert got.dtype == torch.long and len(got) == steps
        assert got.tolist() == reference[:steps].tolist(), steps
    assert timesteps(T, 50)[:3].tolist() == [999, 979, 959]


@pytest.mark.parametrize("steps", [1, 3, 50, 250, 600, 1000])
@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_timesteps_equal_diffusers_trailing(cls, steps):
    assert timesteps(T, steps).tolist() == _diffusers_timesteps(cls, steps)


def test_timesteps_drop_diffusers_spurious_final_minus_one():
    # Float rounding makes numpy's arange one longer for some S; diffusers then visits t = −1.
    reference = _diffusers_timesteps(DDIMScheduler, 61)
    assert len(reference) == 62 and reference[-1] == -1
    assert timesteps(T, 61).tolist() == reference[:61]


@pytest.mark.parametrize("steps", [0, -1, T + 1])
def test_timesteps_reject_out_of_range_steps(steps):
    with pytest.raises(ValueError, match="between 1 and"):
        timesteps(T, steps)


def test_ddpm_plan_is_diffusers_previous_timestep():
    scheduler = DDPMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    scheduler.set_timesteps(50)
    t, t_prev = ddpm_plan(T, 50)
    assert t_prev.tolist() == [int(scheduler.previous_timestep(int(k))) for k in t]
    assert t_prev[-1].item() == -1 and t_prev[:-1].tolist() == t[1:].tolist()


def test_ddim_plan_steps_back_by_T_over_S():
    t, t_prev = ddim_plan(T, 50)
    assert t_prev.tolist() == (t - 20).tolist() and t_prev[-1].item() == -1
    assert t_prev[:-1].tolist() == t[1:].tolist()  # S divides T: the next visited timestep
    t, t_prev = ddim_plan(T, 600)  # S does not divide T: diffusers' rule t − 1, ending at t = 0
    assert t_prev.tolist() == (t - 1).tolist() and t_prev[-1].item() == 0


def test_full_chain_ddpm_coefficients_are_algorithm_2(schedule):
    t = torch.arange(T)
    for variance, table in (
        (Variance.POSTERIOR, schedule.posterior_variance),
        (Variance.BETA, schedule.betas),
    ):
        coefs = ddpm_coefficients(schedule, t, t - 1, variance)
        torch.testing.assert_close(coefs.x0, schedule.posterior_mean_coef1, rtol=1e-12, atol=0)
        torch.testing.assert_close(coefs.xt, schedule.posterior_mean_coef2, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(coefs.sigma[1:] ** 2, table[1:], rtol=1e-12, atol=0)
        assert coefs.sigma[0].item() == 0.0 and not coefs.eps.any()


def test_ddim_with_eta_one_is_the_ddpm_posterior_step(schedule):
    # Song et al. 2021, §4.1: η = 1 gives σ² = β̃ and the DDPM mean (when ε and x̂_0 agree, i.e. no clipping).
    gen = torch.Generator().manual_seed(4)
    xt, eps, z = (torch.randn(4, 1, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    t, t_prev = torch.tensor([999, 500, 40, 19]), torch.tensor([979, 480, 20, -1])
    ddim = ddim_coefficients(schedule, t, t_prev, eta=1.0)
    ddpm = ddpm_coefficients(schedule, t, t_prev, Variance.POSTERIOR)
    torch.testing.assert_close(ddim.sigma, torch.where(t_prev >= 0, ddpm.sigma, 0.0))
    got = denoise_step(schedule, xt, eps, t, ddim, z, clip_denoised=False)[0]
    want = denoise_step(schedule, xt, eps, t, ddpm, z, clip_denoised=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("steps", [T, 50])
def test_ddim_eta0_matches_diffusers(schedule, steps, clip):
    ours = []
    result = sample_ddim(
        fake_model,
        x_T(),
        schedule,
        steps=steps,
        clip_denoised=clip,
        callback=lambda i, t, xt, pred_x0: ours.append((t[0].item(), xt, pred_x0)),
    )
    scheduler = DDIMScheduler(
        beta_schedule="linear", clip_sample=clip, set_alpha_to_one=True, timestep_spacing="trailing"
    )
    scheduler.set_timesteps(steps)
    x = x_T()
    for (t_ours, xt_ours, pred_ours), t in zip(ours, scheduler.timesteps, strict=True):
        assert t_ours == t.item()
        torch.testing.assert_close(xt_ours, x, rtol=0, atol=1e-4)
        out = scheduler.step(fake_model(x, t.expand(SHAPE[0])), t, x)
        torch.testing.assert_close(pred_ours, out.pred_original_sample, rtol=0, atol=1e-4)
        x = out.prev_sample
    torch.testing.assert_close(result, x, rtol=0, atol=1e-4)
    assert result.abs().max() <= 1.0 + 1e-6 or not clip


def test_ddim_clipping_changes_the_result(schedule):
    clipped = sample_ddim(fake_model, x_T(), schedule, steps=50, clip_denoised=True)
    unclipped = sample_ddim(fake_model, x_T(), schedule, steps=50, clip_denoised=False)
    assert (clipped - unclipped).abs().max() > 0.1


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("steps", [T, 50])
def test_ddpm_matches_diffusers_given_the_same_noise(schedule, monkeypatch, steps, variance_type):
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(steps, *SHAPE, generator=gen)
    ours = []
    result = sample_ddpm(
        fake_model,
        x_T(),
        schedule,
        steps=steps,
        variance=Variance.from_diffusers(variance_type),
        clip_denoised=True,
        noise_fn=lambda i: noise[i],
        callback=lambda i, t, xt, pred_x0: ours.append(xt),
    )
    scheduler = DDPMScheduler(
        beta_schedule="linear", variance_type=variance_type, clip_sample=True, timestep_spacing="trailing"
    )
    scheduler.set_timesteps(steps)
    step = {"i": 0}
    # diffusers draws its z with randn_tensor inside step(); hand it ours instead.
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: noise[step["i"]])
    x = x_T()
    for i, t in enumerate(scheduler.timesteps):
        step["i"] = i
        torch.testing.assert_close(ours[i], x, rtol=0, atol=1e-4)
        x = scheduler.step(fake_model(x, t.expand(SHAPE[0])), t, x).prev_sample
    last_t = int(scheduler.timesteps[-1])
    # Algorithm 2 adds no noise on the step to x_0; diffusers adds σ·z whenever t > 0, and with trailing
    # steps (last t = 19) and fixed_large that σ² is β' = 1 − ᾱ_19, far from 0.
    extra = scheduler._get_variance(last_t).sqrt() * noise[-1] if last_t > 0 else 0.0
    torch.testing.assert_close(result + extra, x, rtol=0, atol=1e-4)
    if steps == 50 and variance_type == "fixed_large":
        assert (result - x).abs().max() > 0.01


def test_mixed_rows_equal_each_row_alone(schedule):
    gen = torch.Generator().manual_seed(6)
    xt, eps, z = (torch.randn(4, 1, 4, 4, generator=gen) for _ in range(3))
    t = torch.tensor([999, 500, 19, 0])
    t_prev = torch.tensor([979, 480, -1, -1])
    eta = torch.tensor([0.0, 0.7, 1.0, 0.0], dtype=torch.float64)
    clip = torch.tensor([True, False, True, False])
    is_ddim = torch.tensor([False, True, True, False])
    is_posterior = torch.tensor([True, False, False, False])

    def rule(rows: slice, i: int) -> StepCoefficients:
        if is_ddim[i]:
            return ddim_coefficients(schedule, t[rows], t_prev[rows], eta[rows])
        return ddpm_coefficients(schedule, t[rows], t_prev[rows], "posterior" if is_posterior[i] else "beta")

    ddpm = StepCoefficients.where(
        is_posterior,
        ddpm_coefficients(schedule, t, t_prev, Variance.POSTERIOR),
        ddpm_coefficients(schedule, t, t_prev, Variance.BETA),
    )
    merged = StepCoefficients.where(is_ddim, ddim_coefficients(schedule, t, t_prev, eta), ddpm)
    stacked = StepCoefficients.cat([rule(slice(i, i + 1), i) for i in range(4)])
    for name in ("x0", "xt", "eps", "sigma"):
        torch.testing.assert_close(getattr(merged, name), getattr(stacked, name), rtol=0, atol=0)
    x_prev, pred_x0 = denoise_step(schedule, xt, eps, t, merged, z, clip_denoised=clip)
    assert pred_x0[0].abs().max() <= 1 and pred_x0[1].abs().max() > 1  # the per-row clip took effect
    for i in range(4):
        rows = slice(i, i + 1)
        alone = denoise_step(
            schedule, xt[rows], eps[rows], t[rows], rule(rows, i), z[rows], clip_denoised=bool(clip[i])
        )
        torch.testing.assert_close(x_prev[rows], alone[0], rtol=0, atol=0)
        torch.testing.assert_close(pred_x0[rows], alone[1], rtol=0, atol=0)


def test_ddim_with_eta_needs_noise(schedule):
    with pytest.raises(ValueError, match="noise_fn"):
        sample_ddim(fake_model, x_T(), schedule, steps=10, eta=0.5)


def test_ddim_is_deterministic_and_noise_enters_only_with_eta(schedule):
    calls = []

    def noise_fn(i: int) -> torch.Tensor:
        calls.append(i)
        return torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i))

    a = sample_ddim(fake_model, x_T(), schedule, steps=10, eta=0.0, noise_fn=noise_fn)
    b = sample_ddim(fake_model, x_T(), schedule, steps=10, eta=0.0)
    c = sample_ddim(fake_model, x_T(), schedule, steps=10, eta=1.0, noise_fn=noise_fn)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    assert calls == list(range(10)) * 2
