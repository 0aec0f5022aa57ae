"""Driving an Engine straight, without HTTP: a listener that collects results, and sample jobs."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from app.engine.work import Work


class Collector:
    """A Listener that keeps each job's images and first-preview time, and wakes whoever waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ended: dict[str, threading.Event] = {}
        self.outcomes: dict[str, tuple[str, Any]] = {}
        self.first_preview: dict[str, float] = {}  # time.perf_counter() of the first x̂₀ preview

    def _event(self, job_id: str) -> threading.Event:
        with self._lock:
            return self._ended.setdefault(job_id, threading.Event())

    def _end(self, job_id: str, outcome: str, payload: Any = None) -> None:
        self.outcomes[job_id] = (outcome, payload)
        self._event(job_id).set()

    def on_started(self, job_id: str, steps: int) -> None:
        pass

    def on_progress(self, job_id, step, steps, t, x0, xt) -> None:
        if x0 is not None:
            self.first_preview.setdefault(job_id, time.perf_counter())

    def on_finished(self, job_id: str, images: torch.Tensor, extra: dict[str, Any]) -> None:
        self._end(job_id, "finished", images)

    def on_failed(self, job_id: str, code: str, message: str) -> None:
        self._end(job_id, "failed", f"{code}: {message}")

    def on_cancelled(self, job_id: str) -> None:
        self._end(job_id, "cancelled")

    def wait(self, job_id: str, timeout: float = 3600) -> torch.Tensor:
        """The job's images; raises if it did not finish."""
        if not self._event(job_id).wait(timeout):
            raise TimeoutError(f"{job_id} did not end within {timeout} s")
        outcome, payload = self.outcomes[job_id]
        if outcome != "finished":
            raise RuntimeError(f"{job_id} {outcome}: {payload}")
        return payload


def sample_work(
    job_id: str,
    *,
    model: str,
    n: int,
    steps: int,
    sampler: str = "ddpm",
    seed: int = 0,
    stream_every: int = 0,
    variance: str = "beta",
) -> Work:
    """A validated /sample job as the API would hand it to the engine (σ² = β, clipping, η = 0)."""
    params = {
        "n": n,
        "steps": steps,
        "sampler": sampler,
        "eta": 0.0,
        "variance": variance,
        "clip_denoised": True,
        "seed": seed,
        "stream_every": stream_every,
    }
    return Work(job_id=job_id, kind="sample", model=model, params=params)
