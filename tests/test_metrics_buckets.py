"""The engine histograms' buckets span what the settings allow: a batch of DDPM_MAX_BATCH rows and a
step as long as DDPM_ENGINE_STALL_SECONDS (past which it counts as hung) each land in a finite bucket."""

from __future__ import annotations

import itertools
import math

from annotated_types import Le

from app import metrics
from app.settings import Settings


def finite_bounds(histogram) -> list[float]:
    bounds = list(histogram._upper_bounds)
    assert bounds[-1] == math.inf
    return bounds[:-1]


def test_batch_size_buckets_reach_the_largest_max_batch():
    (largest,) = [m.le for m in Settings.model_fields["max_batch"].metadata if isinstance(m, Le)]
    bounds = finite_bounds(metrics.ENGINE_BATCH_SIZE)
    assert bounds[0] == 1 and bounds[-1] >= largest
    assert all(b == 2 * a for a, b in itertools.pairwise(bounds))  # a bucket per doubling


def test_step_buckets_reach_the_default_stall_limit():
    bounds = finite_bounds(metrics.ENGINE_STEP_SECONDS)
    assert bounds[-1] >= Settings().engine_stall_seconds
    assert bounds[0] <= 0.001  # a small batch on a GPU
    assert all(b / a <= 5 for a, b in itertools.pairwise(bounds))  # no coarse gap
