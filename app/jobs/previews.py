"""A job's preview events within its budget of stored bytes (DDPM_MAX_PREVIEW_BYTES), for both modes.

Every preview is kept for /stream replay until the job expires, in memory (embedded) or in Redis
(distributed), so the bytes a job may store are capped, not only the number of its previews. The rule,
the same for the embedded runner and a worker's listener (both call `PreviewBudget.event` on the job's
own encoder/writer thread, so a job's previews are counted in order):

- a preview carries x̂₀ of every image while the job's stored previews, with it, fit in the budget;
- it also carries x_t (sent only to `?xt=true`) while they, x_t included, fit in half the budget, so x_t
  never crowds out x̂₀;
- once x̂₀ no longer fits, that progress event and every later one of the job carry `"x0": []` and
  `"preview_budget_exhausted": true` (step, steps and t still flow); once x_t no longer fits, no later
  event carries `"xt"`.

Bytes are those of the base64 PNG strings. The API hands each job its budget in the work's params
(`BUDGET_PARAM`), so the API's setting applies whoever runs the job; work queued without one gets the
default. A job restarted from scratch elsewhere (a worker takeover) starts a fresh budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from app.jobs.encoding import preview_pngs

BUDGET_PARAM = "preview_bytes"  # the Work param carrying the job's budget
DEFAULT_PREVIEW_BYTES = 8 * 1024 * 1024
EXHAUSTED = "preview_budget_exhausted"  # the progress-event field saying x̂₀ is no longer stored


def _size(pngs: list[str]) -> int:
    return sum(len(text) for text in pngs)


@dataclass
class PreviewBudget:
    """One job's spending; not thread-safe (a job's previews are encoded on one thread, in order)."""

    limit: int
    used: int = 0
    x0_spent: bool = False
    xt_spent: bool = False

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> PreviewBudget:
        """The budget of a job whose work has `params`."""
        limit = params.get(BUDGET_PARAM)
        return cls(DEFAULT_PREVIEW_BYTES if limit is None else max(0, int(limit)))

    def event(
        self,
        step: int,
        steps: int,
        t: int,
        x0: torch.Tensor,
        xt: torch.Tensor,
        encode: Callable[[torch.Tensor], list[str]] = preview_pngs,
    ) -> dict[str, Any]:
        """The progress event's data for a preview step, images included as far as the budget allows;
        `encode`: (n, C, H, W) -> n base64 PNGs."""
        data: dict[str, Any] = {"step": step, "steps": steps, "t": t}
        if not self.x0_spent:
            x0_pngs = encode(x0)
            if self.used + _size(x0_pngs) <= self.limit:
                self.used += _size(x0_pngs)
                data["x0"] = x0_pngs
            else:
                self.x0_spent = self.xt_spent = True
        if self.x0_spent:
            data["x0"] = []
            data[EXHAUSTED] = True
            return data
        if not self.xt_spent:
            xt_pngs = encode(xt)
            if self.used + _size(xt_pngs) <= self.limit // 2:
                self.used += _size(xt_pngs)
                data["xt"] = xt_pngs
            else:
                self.xt_spent = True
        return data
