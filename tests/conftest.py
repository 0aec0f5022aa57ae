"""Fixtures for the whole suite."""

from __future__ import annotations

import pytest
import torch

from app.engine import threads


@pytest.fixture(autouse=True)
def _torch_threads_as_they_were(monkeypatch):
    """`ddpm-serve` and `ddpm-worker` confine torch to one thread for good (app.engine.threads); a test
    that runs them in this process must not leave the rest of the suite computing so."""
    monkeypatch.setattr(threads, "_engine_threads", threads._engine_threads)
    count = torch.get_num_threads()
    yield
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
