"""What the engine is asked to do and how it reports back: the contract between jobs/API and engine.

The engine never sees HTTP or Redis. A `Work` is one job's request, already validated; the engine
calls a `Listener` from its own thread as the job advances. Listeners must return quickly (hand the
tensors to another thread for encoding), since they run inside the denoising loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

KINDS = ("sample", "interpolate", "reconstruct", "likelihood")


@dataclass
class Work:
    """One job for one model.

    params (JSON-able, validated by the API, defaults filled in), by kind:
      sample:      n, steps, sampler ("ddpm"|"ddim"), eta, variance ("beta"|"posterior"),
                   clip_denoised, seed
      interpolate: t (list[int]), lambdas (list[float]), steps (int|None), seed, and for each of
                   "a"/"b" either an input array or params["a_seed"]/["b_seed"] (a fresh sample)
      reconstruct: t, n, seed
      likelihood:  seed, curve
      every kind:  stream_every (0 = no previews)
    inputs: float32 arrays in [-1, 1]: "latents" (n, C, H, W) for sample; "a", "b" (C, H, W) for
      interpolate; "image" (C, H, W) for reconstruct; "images" (m, C, H, W) for likelihood.
    """

    job_id: str
    kind: str
    model: str
    params: dict[str, Any]
    inputs: dict[str, np.ndarray] = field(default_factory=dict)


class Listener(Protocol):
    """Receives a job's progress from the engine thread, in order, exactly once per transition."""

    def on_started(self, job_id: str, steps: int) -> None: ...

    def on_progress(
        self, job_id: str, step: int, steps: int, t: int, x0: torch.Tensor | None, xt: torch.Tensor | None
    ) -> None:
        """`step` of `steps` done, at timestep index t. On preview steps (every `stream_every`, and the
        last) x0, xt are (n, C, H, W) float32 CPU tensors, x̂₀ and the x_t it came from; else None."""

    def on_finished(self, job_id: str, images: torch.Tensor, extra: dict[str, Any]) -> None:
        """images: (n, C, H, W) float32 CPU in [-1, 1] (empty for likelihood); extra: kind-specific JSON."""

    def on_failed(self, job_id: str, code: str, message: str) -> None: ...

    def on_cancelled(self, job_id: str) -> None: ...
