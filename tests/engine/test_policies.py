"""Engine admission policies (step / request / serial) and the fast paths inside the engine: different
waiting, the same images."""

import pytest
import torch
from torch._dynamo.utils import counters

from app.engine.fastpath import FastPath
from app.sampling import generate
from tests.engine.conftest import sample_work
from tests.tiny import BATCH_ATOL, tiny_checkpoint

# Jobs queued before the loop starts, in this order. Widths 1 + 1 + 1 with max_batch 2.
JOBS = {
    "a": dict(n=1, steps=10, seed=1),
    "b": dict(n=1, steps=4, sampler="ddim", seed=2),
    "c": dict(n=1, steps=10, variance="posterior", clip=False, seed=3),
}
# step: a and b share steps 1–4, c joins at step 5 and ends at 14. request: c waits for a (10) and
# runs 11–20. serial: 10 + 4 + 10.
FORWARDS = {"step": 14, "request": 20, "serial": 24}


def _run(engine_factory, policy, **options):
    engine, rec = engine_factory(max_batch=2, policy=policy, **options)
    for job_id, kw in JOBS.items():
        engine.submit(sample_work(job_id, **kw))
    engine.start()
    images = {}
    for job_id in JOBS:
        outcome, payload = rec.wait(job_id)
        assert outcome == "finished", payload
        images[job_id] = payload[0]
    return engine, images


def test_each_policy_batches_as_documented_and_gives_the_same_images(engine_factory):
    runs = {policy: _run(engine_factory, policy) for policy in FORWARDS}
    assert {policy: engine.forwards for policy, (engine, _) in runs.items()} == FORWARDS
    reference = runs["step"][1]
    for policy in ("request", "serial"):
        for job_id in JOBS:
            torch.testing.assert_close(runs[policy][1][job_id], reference[job_id], atol=BATCH_ATOL, rtol=0)


def test_request_policy_lets_jobs_admitted_together_share_the_batch(engine_factory):
    engine, rec = engine_factory(max_batch=8, policy="request")
    for k in range(3):
        engine.submit(sample_work(f"j{k}", n=2, steps=10, seed=k))
    engine.start()
    for k in range(3):
        assert rec.wait(f"j{k}")[0] == "finished"
    assert engine.forwards == 10


def test_unknown_policy_is_refused(engine_factory):
    with pytest.raises(ValueError, match="policy"):
        engine_factory(policy="fifo")


def test_channels_last_engine_equals_plain_generate(engine_factory):
    ckpt = tiny_checkpoint(timesteps=40)  # its own model: channels_last converts it in place
    engine, rec = engine_factory(ckpt=ckpt, fast=FastPath(channels_last=True))
    engine.start()
    engine.submit(sample_work("cl", n=3, steps=40, seed=4))
    reference = generate(tiny_checkpoint(timesteps=40), n=3, steps=40, variance="beta", seed=4).images
    _, (images, _) = rec.wait("cl")
    torch.testing.assert_close(images, reference, atol=1e-4, rtol=0)


def test_bfloat16_engine_stays_close_to_float32(engine_factory):
    """16-bit ε through 40 ancestral steps: the budget is 0.05 mean and 0.5 max absolute deviation on
    images in [−1, 1] (random weights amplify errors more than a trained model does)."""
    engine, rec = engine_factory(ckpt=tiny_checkpoint(timesteps=40), fast=FastPath(dtype="bfloat16"))
    engine.start()
    engine.submit(sample_work("bf16", n=4, steps=40, seed=5))
    reference = generate(tiny_checkpoint(timesteps=40), n=4, steps=40, variance="beta", seed=5).images
    _, (images, _) = rec.wait("bf16")
    deviation = (images - reference).abs()
    assert deviation.mean() <= 0.05 and deviation.max() <= 0.5, (deviation.mean(), deviation.max())
    assert deviation.max() > 0


@pytest.mark.slow
def test_compiled_engine_equals_plain_generate(engine_factory):
    """compile: the U-Net per bucket (1, 2) and the update, at start(); about a minute cold."""
    fast = FastPath(compile=True, channels_last=True)
    engine, rec = engine_factory(max_batch=2, ckpt=tiny_checkpoint(timesteps=40), fast=fast)
    engine.start()
    # The engine's thread compiles, so a thread-local `torch._dynamo.config.patch(error_on_recompile=…)`
    # here would not see it: the global graph count must not move after start(). The tiny model has one
    # channel, whose stride differs between NCHW warm-up inputs and the channels_last step buffers.
    compiled = counters["stats"]["unique_graphs"]
    engine.submit(sample_work("c1", n=1, steps=40, seed=6))
    engine.submit(sample_work("c2", n=1, steps=20, sampler="ddim", seed=7))
    for job_id, ref in (
        ("c1", generate(tiny_checkpoint(timesteps=40), n=1, steps=40, variance="beta", seed=6)),
        ("c2", generate(tiny_checkpoint(timesteps=40), n=1, steps=20, sampler="ddim", seed=7)),
    ):
        outcome, payload = rec.wait(job_id)
        assert outcome == "finished", payload
        torch.testing.assert_close(payload[0], ref.images, atol=1e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] == compiled  # start() compiled everything
