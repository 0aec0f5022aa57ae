"""An unexpected exception's text never reaches the client (it may name /tmp/torchinductor paths, the
device, or, for a batch, other users' jobs): the job's message names the exception's type and its own
job id, and the full exception is logged at ERROR with the job id, once."""

from __future__ import annotations

import logging

from tests.engine.conftest import fail_forward_once, sample_work

SECRET = "/tmp/torchinductor_alice/ab/cabc123.py: CUDA error on device 0 (NVIDIA H200, job other-users-job)"


def _error_records(caplog):
    return [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "app.engine.engine"]


def test_a_batch_failure_tells_each_job_only_its_own_id_and_logs_the_details(engine_factory, caplog):
    engine, rec = engine_factory()
    fail_forward_once(engine, 2, RuntimeError(SECRET))
    engine.submit(sample_work("alice", n=1, steps=5))
    engine.submit(sample_work("bob", n=1, steps=5))
    with caplog.at_level(logging.WARNING, logger="app.engine.engine"):
        engine.start()
        failures = {job_id: rec.wait(job_id)[1] for job_id in ("alice", "bob")}
    for job_id, (code, message) in failures.items():
        assert code == "engine_error"
        assert message == (
            f"the engine failed on this step (RuntimeError); the server log has the details, job {job_id}"
        )
        assert "torchinductor" not in message and "H200" not in message
    assert "bob" not in failures["alice"][1] and "alice" not in failures["bob"][1]
    errors = _error_records(caplog)
    assert len(errors) == 1, [r.getMessage() for r in errors]  # one line (with its traceback) per failure
    logged = caplog.text
    assert SECRET in logged and "alice" in errors[0].getMessage() and "bob" in errors[0].getMessage()


def test_a_job_error_tells_the_client_the_type_and_logs_the_exception_with_the_job_id(engine_factory, caplog):
    engine, rec = engine_factory()
    report = rec.on_progress

    def on_progress(job_id, step, steps, t, x0, xt):
        if job_id == "carol" and step == 2:
            raise MemoryError(SECRET)
        report(job_id, step, steps, t, x0, xt)

    rec.on_progress = on_progress
    engine.submit(sample_work("carol", n=1, steps=5, stream_every=1))
    with caplog.at_level(logging.WARNING, logger="app.engine.engine"):
        engine.start()
        code, message = rec.wait("carol")[1]
    assert code == "job_error"
    assert message == (
        "this job failed in the engine (MemoryError); the server log has the details, job carol"
    )
    errors = _error_records(caplog)
    assert len(errors) == 1 and "job carol" in errors[0].getMessage() and SECRET in caplog.text


def test_a_fault_outside_any_job_logs_every_failed_job_id(engine_factory, caplog, monkeypatch):
    engine, rec = engine_factory()
    advance = engine._advance_runs
    broken = [True]

    def once_broken(active, previews):
        if broken.pop() if broken else False:
            raise RuntimeError(SECRET)
        advance(active, previews)

    monkeypatch.setattr(engine, "_advance_runs", once_broken)
    engine.submit(sample_work("dave", n=1, steps=5))
    with caplog.at_level(logging.WARNING, logger="app.engine.engine"):
        engine.start()
        code, message = rec.wait("dave")[1]
    assert code == "engine_error" and SECRET not in message and message.endswith("job dave")
    errors = _error_records(caplog)
    assert len(errors) == 1 and "dave" in errors[0].getMessage() and SECRET in caplog.text


def test_known_failures_keep_their_messages(engine_factory):
    import numpy as np

    engine, rec = engine_factory()
    engine.submit(sample_work("nan", n=1, steps=5, latents=np.full((1, 1, 8, 8), np.nan, dtype=np.float32)))
    engine.start()
    assert rec.wait("nan")[1] == ("non_finite", "the model produced NaN or infinite values")
