"""Groups: the rows of one job that share one timestep plan. The engine batches rows of many groups.

A `ChainGroup` runs a reverse chain (DDPM ancestral or DDIM, eq. 12 of Song et al.) from x at its
first t down to x_0. A `BoundGroup` evaluates the variational bound term by term (eq. 5), t = T−1..0.
Every row draws from its own random stream (app.rng), so results never depend on batch neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from app.diffusion import Variance, prior_bpd, q_sample, vb_terms_bpd
from app.diffusion.schedule import Schedule
from app.engine.steps import StepTable, chain_table
from app.rng import ImageNoise


@dataclass(eq=False)
class Group:
    """Rows of one job at the same position of the same plan of (t, t_prev) indices."""

    job_id: str
    plan_t: list[int]
    plan_t_prev: list[int]
    noise: ImageNoise
    pos: int = 0
    result: Tensor | None = None

    @property
    def rows(self) -> int:
        return len(self.noise)

    @property
    def t(self) -> int:
        return self.plan_t[self.pos]

    @property
    def t_prev(self) -> int:
        return self.plan_t_prev[self.pos]

    @property
    def remaining(self) -> int:
        return len(self.plan_t) - self.pos

    def model_input(self, s: Schedule) -> Tensor:
        raise NotImplementedError

    def rows_t(self, s: Schedule) -> Tensor:
        """(rows,) long: the current t of every row, made on the device (no host-to-device copy)."""
        return torch.full((self.rows,), self.t, dtype=torch.long, device=s.betas.device)


@dataclass(eq=False)
class ChainGroup(Group):
    """A reverse chain: x is x_t before the step at `pos`. Per-group rule, η, variance and clipping."""

    x: Tensor = field(default=None)  # type: ignore[assignment]
    sampler: str = "ddpm"
    eta: float = 0.0
    variance: Variance = Variance.BETA
    clip_denoised: bool = True
    _table: StepTable | None = None

    def model_input(self, s: Schedule) -> Tensor:
        return self.x

    def table(self, s: Schedule) -> StepTable:
        """The whole plan's t and coefficients on the device, computed on the group's first step."""
        if self._table is None:
            self._table = chain_table(
                s,
                self.plan_t,
                self.plan_t_prev,
                sampler=self.sampler,
                eta=self.eta,
                variance=self.variance,
                clip_denoised=self.clip_denoised,
                device=self.x.device,
            )
        return self._table

    def rows_t(self, s: Schedule) -> Tensor:
        return self.table(s).t[self.pos : self.pos + 1].expand(self.rows)

    def rows_coef(self, s: Schedule) -> Tensor:
        """(rows, COLUMNS): this step's coefficients for every row (app.engine.steps), a view."""
        return self.table(s).coef[self.pos : self.pos + 1].expand(self.rows, -1)

    def advance(self, x_prev: Tensor) -> None:
        self.x = x_prev
        self.pos += 1
        if self.remaining == 0:
            self.result = x_prev


@dataclass(eq=False)
class BoundGroup(Group):
    """The bound in bits/dim: at each t, x_t ~ q(x_t|x_0) with fresh noise, then L_{t−1} (or L_0)."""

    x0: Tensor = field(default=None)  # type: ignore[assignment]
    variance: Variance = Variance.BETA
    terms: Tensor | None = None  # (rows, T) bits/dim per t
    mse: Tensor | None = None  # (rows, T) mean squared error of x̂₀, model scale
    _xt: Tensor | None = None

    def model_input(self, s: Schedule) -> Tensor:
        if self.terms is None:
            self.terms = self.x0.new_zeros(self.rows, s.num_timesteps)
            self.mse = self.x0.new_zeros(self.rows, s.num_timesteps)
        t = torch.full((self.rows,), self.t, dtype=torch.long, device=self.x0.device)
        self._xt = q_sample(s, self.x0, t, self.noise.randn())
        return self._xt

    def record(self, s: Schedule, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Store this t's term; returns (x_t, x̂₀) for previews."""
        t = torch.full((self.rows,), self.t, dtype=torch.long, device=self.x0.device)
        bpd, pred_x0 = vb_terms_bpd(s, eps, self.x0, self._xt, t, variance=self.variance, clip_denoised=True)
        self.terms[:, self.t] = bpd
        self.mse[:, self.t] = ((pred_x0 - self.x0) ** 2).flatten(1).mean(1)
        xt = self._xt
        self.pos += 1
        if self.remaining == 0:
            self.result = torch.cat([prior_bpd(s, self.x0)[:, None], self.terms], dim=1)
        return xt, pred_x0
