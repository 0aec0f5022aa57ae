"""The engine's per-row update (app/engine/steps.py) is `denoise_step`, bit for bit in eager mode."""

import pytest
import torch

from app.diffusion import (
    Schedule,
    Variance,
    ddim_coefficients,
    ddim_plan,
    ddpm_coefficients,
    ddpm_plan,
    denoise_step,
)
from app.engine.steps import COLUMNS, chain_table, compiled_update, fused_update

T = 1000
CHAINS = {
    "ddpm-beta": dict(sampler="ddpm", eta=0.0, variance=Variance.BETA, clip_denoised=True, steps=50),
    "ddpm-posterior": dict(
        sampler="ddpm", eta=0.0, variance=Variance.POSTERIOR, clip_denoised=False, steps=7
    ),
    "ddim": dict(sampler="ddim", eta=0.0, variance=Variance.BETA, clip_denoised=True, steps=20),
    "ddim-eta": dict(sampler="ddim", eta=0.7, variance=Variance.BETA, clip_denoised=False, steps=13),
}


@pytest.fixture(scope="module")
def schedule() -> Schedule:
    return Schedule.from_config("linear", T)


def _table(schedule, steps, sampler, **kw):
    plan_t, plan_t_prev = (ddim_plan if sampler == "ddim" else ddpm_plan)(T, steps)
    table = chain_table(
        schedule, plan_t.tolist(), plan_t_prev.tolist(), sampler=sampler, device=torch.device("cpu"), **kw
    )
    return table, plan_t, plan_t_prev


@pytest.mark.parametrize("name", CHAINS)
def test_fused_update_is_denoise_step_bit_for_bit(schedule, name):
    kw = dict(CHAINS[name])
    steps = kw.pop("steps")
    table, plan_t, plan_t_prev = _table(schedule, steps, **kw)
    assert table.coef.shape == (steps, COLUMNS) and table.coef.dtype == torch.float32
    assert table.t.tolist() == plan_t.tolist()
    gen = torch.Generator().manual_seed(0)
    rows = 3
    for k in (0, steps // 2, steps - 1):  # the first step, one inside, the step onto x_0
        xt, eps, z = (2 * torch.randn(rows, 1, 6, 6, generator=gen) for _ in range(3))
        t = plan_t[k].repeat(rows)
        t_prev = plan_t_prev[k].repeat(rows)
        if kw["sampler"] == "ddim":
            coefs = ddim_coefficients(schedule, t, t_prev, kw["eta"])
        else:
            coefs = ddpm_coefficients(schedule, t, t_prev, kw["variance"])
        want = denoise_step(schedule, xt, eps, t, coefs, z, clip_denoised=kw["clip_denoised"])
        got = fused_update(xt, eps, z, table.coef[k : k + 1].expand(rows, -1))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), k


def test_rows_of_different_chains_in_one_update_equal_each_alone(schedule):
    tables = []
    for kw in CHAINS.values():
        kw = dict(kw)
        tables.append(_table(schedule, kw.pop("steps"), **kw)[0])
    gen = torch.Generator().manual_seed(1)
    xt, eps, z = (2 * torch.randn(len(tables), 1, 4, 4, generator=gen) for _ in range(3))
    coef = torch.cat([table.coef[1:2] for table in tables])
    x_prev, pred_x0 = fused_update(xt, eps, z, coef)
    assert pred_x0[0].abs().max() <= 1 and pred_x0[1].abs().max() > 1  # per-row clipping
    for i in range(len(tables)):
        alone = fused_update(xt[i : i + 1], eps[i : i + 1], z[i : i + 1], coef[i : i + 1])
        assert torch.equal(x_prev[i : i + 1], alone[0]) and torch.equal(pred_x0[i : i + 1], alone[1])


def test_compiled_update_matches_eager_within_float32_rounding(schedule):
    """Inductor may fuse a·b + c into one FMA: equal to 1e-6, not bit for bit."""
    table = _table(schedule, 50, sampler="ddpm", eta=0.0, variance=Variance.BETA, clip_denoised=True)[0]
    step = compiled_update()
    gen = torch.Generator().manual_seed(2)
    for rows in (1, 2, 5):  # a size of one is specialised apart; the rest share one dynamic kernel
        xt, eps, z = (2 * torch.randn(rows, 3, 8, 8, generator=gen) for _ in range(3))
        coef = table.coef[rows : rows + 1].expand(rows, -1)
        for got, want in zip(step(xt, eps, z, coef), fused_update(xt, eps, z, coef), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
