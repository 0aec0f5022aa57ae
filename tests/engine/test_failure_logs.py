"""Every job the engine fails leaves a WARNING naming the job, its model and the error code, and not
what the job was sent (the error message may quote its parameters)."""

from __future__ import annotations

import logging

import numpy as np

from tests.engine.conftest import sample_work


def test_every_failed_job_is_logged_with_its_code_and_without_its_parameters(engine_factory, caplog):
    engine, rec = engine_factory()
    nan = np.full((1, 1, 8, 8), np.nan, dtype=np.float32)
    engine.submit(sample_work("diverged", n=1, steps=5, latents=nan))
    engine.submit(sample_work("too-long", n=1, steps=5))
    engine._queue[-1].params["steps"] = 12_345  # more than the model's T = 40: refused at admission
    with caplog.at_level(logging.WARNING, logger="app.engine.engine"):
        engine.start()
        assert rec.wait("diverged")[1][0] == "non_finite"
        code, message = rec.wait("too-long")[1]
        assert code == "invalid_job" and "12345" in message
    lines = {rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING}
    assert "engine tiny: job diverged failed: non_finite" in lines
    assert "engine tiny: job too-long failed: invalid_job" in lines
    assert "12345" not in caplog.text
