import time

import numpy as np
import pytest
import torch

from app.diffusion import Variance, calc_bpd_loop
from app.engine.work import Work
from app.rng import ImageNoise
from app.sampling import generate, schedule_of
from tests.engine.conftest import fail_forward_once, sample_work
from tests.tiny import BATCH_ATOL


def _images(rec, job_id):
    outcome, payload = rec.wait(job_id)
    assert outcome == "finished", payload
    return payload[0]


def test_sample_equals_library_generate(engine_factory, tiny_ckpt):
    engine, rec = engine_factory()
    engine.start()
    engine.submit(sample_work("a", n=3, steps=40, seed=11))
    engine.submit(sample_work("b", n=2, steps=8, sampler="ddim", seed=5))
    ref_a = generate(tiny_ckpt, n=3, steps=40, sampler="ddpm", variance="beta", seed=11).images
    ref_b = generate(tiny_ckpt, n=2, steps=8, sampler="ddim", seed=5).images
    torch.testing.assert_close(_images(rec, "a"), ref_a, atol=BATCH_ATOL, rtol=0)
    torch.testing.assert_close(_images(rec, "b"), ref_b, atol=BATCH_ATOL, rtol=0)
    assert rec.of("started", "a") == [("started", "a", 40)]


def test_concurrent_jobs_share_forwards_and_keep_their_own_results(engine_factory, tiny_ckpt):
    engine, rec = engine_factory()
    jobs = {
        "ddpm": dict(n=3, steps=40, sampler="ddpm", variance="beta", clip=True, seed=1),
        "ddim": dict(n=2, steps=10, sampler="ddim", eta=0.0, clip=False, seed=2),
        "ddim-eta": dict(n=1, steps=20, sampler="ddim", eta=0.7, clip=True, seed=3),
        "small": dict(n=4, steps=13, sampler="ddpm", variance="posterior", clip=False, seed=4),
    }
    for job_id, kw in jobs.items():  # queued before the thread starts: all join the first step
        engine.submit(sample_work(job_id, **kw))
    engine.start()
    for job_id, kw in jobs.items():
        alone = generate(
            tiny_ckpt,
            n=kw["n"],
            steps=kw["steps"],
            sampler=kw["sampler"],
            eta=kw.get("eta", 0.0),
            variance=kw.get("variance"),
            clip_denoised=kw["clip"],
            seed=kw["seed"],
        ).images
        torch.testing.assert_close(_images(rec, job_id), alone, atol=BATCH_ATOL, rtol=0)
    assert engine.forwards == 40  # the longest chain; the others rode along
    assert engine.running == 0 and engine.queued == 0


def test_image_k_does_not_depend_on_n(engine_factory):
    engine, rec = engine_factory()
    engine.start()
    engine.submit(sample_work("four", n=4, steps=10, seed=9))
    engine.submit(sample_work("two", n=2, steps=10, seed=9))
    torch.testing.assert_close(_images(rec, "four")[:2], _images(rec, "two"), atol=BATCH_ATOL, rtol=0)


def test_max_batch_queues_and_late_jobs_join_between_steps(engine_factory):
    engine, rec = engine_factory(max_batch=3)
    for k in range(3):
        engine.submit(sample_work(f"j{k}", n=2, steps=10, seed=k))
    assert engine.queue_position("j2") == 2
    engine.start()
    for k in range(3):
        _images(rec, f"j{k}")
    # 2 + 2 rows exceed max_batch 3: the jobs ran one after another
    assert engine.forwards == 30


def test_cancel_queued_and_running(engine_factory):
    engine, rec = engine_factory(max_batch=2)
    engine.submit(sample_work("long", n=2, steps=40, stream_every=1))
    engine.submit(sample_work("queued", n=2, steps=5))
    engine.start()
    while not rec.of("progress", "long"):
        pass
    assert engine.cancel("queued") and engine.cancel("long")
    assert rec.wait("long")[0] == "cancelled"
    assert rec.wait("queued")[0] == "cancelled"
    assert rec.of("started", "queued") == []
    steps_done = max(e[2] for e in rec.of("progress", "long"))
    assert steps_done < 40
    assert not engine.cancel("long")  # already gone


def test_a_failing_job_fails_alone(engine_factory):
    engine, rec = engine_factory()
    bad = np.full((1, 1, 8, 8), np.nan, dtype=np.float32)
    engine.submit(sample_work("bad", n=1, steps=5, latents=bad))
    engine.submit(sample_work("good", n=2, steps=5))
    engine.submit(Work(job_id="broken", kind="sample", model="tiny", params={"n": 1}))  # missing params
    engine.start()
    outcome, (code, message) = rec.wait("bad")
    assert (outcome, code) == ("failed", "non_finite") and "NaN" in message
    assert rec.wait("broken")[0] == "failed"
    assert _images(rec, "good").shape == (2, 1, 8, 8)
    engine.submit(sample_work("after", n=1, steps=3))
    assert _images(rec, "after").isfinite().all()


def test_a_job_whose_previews_fail_fails_alone_and_the_slots_gauge_empties(engine_factory):
    from prometheus_client import REGISTRY

    engine, rec = engine_factory()
    report = rec.on_progress

    def on_progress(job_id, step, steps, t, x0, xt):
        if job_id == "bad" and step == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        report(job_id, step, steps, t, x0, xt)

    rec.on_progress = on_progress
    engine.submit(sample_work("bad", n=1, steps=5, stream_every=1))
    engine.submit(sample_work("good", n=2, steps=5, stream_every=1))
    engine.start()
    outcome, (code, message) = rec.wait("bad")
    assert (outcome, code) == ("failed", "job_error") and "RuntimeError" in message and "job bad" in message
    assert "illegal memory access" not in message  # the exception's text stays in the server log
    assert _images(rec, "good").shape == (2, 1, 8, 8) and engine.alive
    running = {"model": "tiny", "state": "running"}
    deadline = time.monotonic() + 10
    while REGISTRY.get_sample_value("ddpm_engine_slots", running) != 0:  # set once the last job ended
        assert time.monotonic() < deadline, REGISTRY.get_sample_value("ddpm_engine_slots", running)
        time.sleep(0.01)


def test_a_fault_outside_any_job_fails_the_running_jobs_and_the_engine_goes_on(engine_factory, monkeypatch):
    engine, rec = engine_factory()
    advance = engine._advance_runs
    broken = [True]

    def once_broken(active, previews):
        if broken.pop() if broken else False:
            raise RuntimeError("a bug between steps")
        advance(active, previews)

    monkeypatch.setattr(engine, "_advance_runs", once_broken)
    engine.submit(sample_work("caught", n=1, steps=5))
    engine.start()
    code, message = rec.wait("caught")[1]
    assert code == "engine_error" and "(RuntimeError)" in message and "a bug between steps" not in message
    engine.submit(sample_work("after", n=1, steps=3))
    assert _images(rec, "after").isfinite().all() and engine.alive


def test_a_forward_that_raises_fails_every_job_in_that_step_and_the_engine_goes_on(engine_factory):
    """E.g. out of device memory in the U-Net: the batch's jobs fail, and the next job runs."""
    engine, rec = engine_factory()
    fail_forward_once(engine, 3, RuntimeError("CUDA out of memory"))
    engine.submit(sample_work("a", n=1, steps=5))
    engine.submit(sample_work("b", n=2, steps=5))
    engine.start()
    for job_id in ("a", "b"):
        code, message = rec.wait(job_id)[1]
        assert code == "engine_error" and "(RuntimeError)" in message and f"job {job_id}" in message
        assert "out of memory" not in message
    engine.submit(sample_work("after", n=1, steps=3))
    assert _images(rec, "after").isfinite().all() and engine.alive


def test_work_for_another_model_is_refused(engine_factory):
    engine, _ = engine_factory()
    with pytest.raises(ValueError, match="work for model 'other' sent to engine 'tiny'"):
        engine.submit(Work(job_id="x", kind="sample", model="other", params={"n": 1}))


def test_a_job_whose_step_table_cannot_be_made_fails_alone(engine_factory, monkeypatch):
    import app.engine.groups as groups

    table = groups.chain_table

    def failing(*args, **kwargs):
        if kwargs["eta"] == 0.25:  # the bad job's marker
            raise RuntimeError("pinned memory exhausted")
        return table(*args, **kwargs)

    monkeypatch.setattr(groups, "chain_table", failing)
    engine, rec = engine_factory()
    engine.submit(sample_work("good", n=2, steps=5, sampler="ddim"))
    engine.submit(sample_work("bad", n=1, steps=5, sampler="ddim", eta=0.25))
    engine.start()
    code, message = rec.wait("bad")[1]  # at set-up
    assert code == "job_error" and "(RuntimeError)" in message and "pinned memory" not in message
    assert _images(rec, "good").shape == (2, 1, 8, 8)


def test_a_job_whose_inputs_cannot_make_a_chain_fails_alone_as_invalid(engine_factory):
    """What the API's validation let through but the chain refuses is the job's fault, not the engine's."""
    engine, rec = engine_factory()
    engine.submit(sample_work("bad", n=1, steps=5, sampler="ddim", eta=0.25))
    engine.submit(sample_work("good", n=1, steps=5))
    bad = engine._queue[0]
    bad.params["steps"] = 10_000  # more steps than the model's T = 40
    engine.submit(sample_work("old", n=1, steps=5))
    del engine._queue[-1].params["sampler"]  # as from an API of another version
    engine.start()
    assert rec.wait("bad") == (
        "failed",
        ("invalid_job", "could not start: steps must be between 1 and the model's 40 timesteps, got 10000"),
    )
    assert rec.wait("old") == ("failed", ("invalid_job", "could not start: parameter 'sampler' is missing"))
    assert _images(rec, "good").shape == (1, 1, 8, 8)


def test_previews_every_k_steps_and_the_last_carry_x0_and_xt(engine_factory):
    engine, rec = engine_factory()
    engine.start()
    engine.submit(sample_work("p", n=2, steps=10, stream_every=4))
    engine.submit(sample_work("quiet", n=1, steps=10, stream_every=0))
    final = _images(rec, "p")
    assert final.shape == (2, 1, 8, 8)
    previews = [e for e in rec.of("progress", "p") if e[5] is not None]
    assert [e[2] for e in previews] == [4, 8, 10]
    assert all(e[3] == 10 and e[5].shape == e[6].shape == (2, 1, 8, 8) for e in previews)
    assert previews[-1][4] == 3  # the last of 10 trailing steps of 40 is t index 3
    assert (previews[-1][5].abs() <= 1).all()  # x̂₀ is clipped
    rec.wait("quiet")
    quiet = rec.of("progress", "quiet")
    assert quiet and all(e[5] is None and e[6] is None for e in quiet)  # step counts, no images


def _reconstruct(job_id, image, *, t, n, seed):
    return Work(
        job_id=job_id,
        kind="reconstruct",
        model="tiny",
        params={"t": t, "n": n, "seed": seed, "stream_every": 0},
        inputs={"image": image},
    )


def test_interpolation_endpoints_are_reconstructions(engine_factory):
    engine, rec = engine_factory()
    engine.start()
    rng = np.random.default_rng(0)
    a, b = (rng.uniform(-1, 1, (1, 8, 8)).astype(np.float32) for _ in range(2))
    engine.submit(
        Work(
            job_id="i",
            kind="interpolate",
            model="tiny",
            params={"t": [20, 30], "lambdas": [0.0, 0.5, 1.0], "steps": None, "seed": 3, "stream_every": 0},
            inputs={"a": a, "b": b},
        )
    )
    engine.submit(_reconstruct("ra", a, t=20, n=2, seed=3))
    engine.submit(_reconstruct("rb", b, t=30, n=1, seed=3))
    rows = _images(rec, "i")
    assert rows.shape == (6, 1, 8, 8)
    assert rec.results["i"][1][1] == {"rows": 2, "columns": 3}
    torch.testing.assert_close(rows[0], _images(rec, "ra")[0], atol=BATCH_ATOL, rtol=0)
    torch.testing.assert_close(rows[5], _images(rec, "rb")[0], atol=BATCH_ATOL, rtol=0)
    assert not torch.allclose(rows[1], rows[0])


def test_previews_of_an_interpolation_at_several_t_hold_every_image_at_every_step(engine_factory):
    engine, rec = engine_factory()
    engine.start()
    rng = np.random.default_rng(0)
    a, b = (rng.uniform(-1, 1, (1, 8, 8)).astype(np.float32) for _ in range(2))
    params = {"t": [5, 30], "lambdas": [0.0, 1.0], "steps": None, "seed": 3, "stream_every": 1}
    engine.submit(Work(job_id="i", kind="interpolate", model="tiny", params=params, inputs={"a": a, "b": b}))
    rows = _images(rec, "i")
    progress = rec.of("progress", "i")
    assert len(progress) == 30  # the t = 30 chain's steps; the t = 5 chain ended after 5 of them
    assert all(e[5].shape == e[6].shape == (4, 1, 8, 8) for e in progress), [e[5].shape for e in progress]
    assert [e[4] for e in progress] == list(range(29, -1, -1))  # the t of the chain still running
    torch.testing.assert_close(progress[10][5][:2], rows[:2])  # the short chain's rows: its result
    torch.testing.assert_close(progress[-1][5], rows)


def test_interpolation_from_seeds_samples_the_sources_first(engine_factory, tiny_ckpt):
    engine, rec = engine_factory()
    engine.start()
    engine.submit(
        Work(
            job_id="s",
            kind="interpolate",
            model="tiny",
            params={
                "t": [10],
                "lambdas": [0.0, 1.0],
                "steps": 5,
                "seed": 1,
                "a_seed": 7,
                "b_seed": 8,
                "stream_every": 0,
            },
        )
    )
    rows = _images(rec, "s")
    assert rec.of("started", "s")[0][2] == 40 + 5
    # The ends are the library's samples for seeds 7 and 8 (all T steps): the same interpolation of
    # those two images, uploaded, gives the same row; the ends are distinct, so seeds are not mixed up.
    source_a, source_b = (generate(tiny_ckpt, n=1, seed=seed).images[0] for seed in (7, 8))
    assert not torch.allclose(source_a, source_b, atol=0.1)
    engine.submit(
        Work(
            job_id="i",
            kind="interpolate",
            model="tiny",
            params={"t": [10], "lambdas": [0.0, 1.0], "steps": 5, "seed": 1, "stream_every": 0},
            inputs={"a": source_a.numpy(), "b": source_b.numpy()},
        )
    )
    assert rows.shape == (2, 1, 8, 8)
    torch.testing.assert_close(rows, _images(rec, "i"), atol=BATCH_ATOL, rtol=0)
    assert not torch.allclose(rows[0], rows[1], atol=0.1)


def test_likelihood_equals_calc_bpd_loop(engine_factory, tiny_ckpt):
    engine, rec = engine_factory()
    engine.start()
    images = np.random.default_rng(1).uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
    images = np.round((images + 1) * 127.5) / 127.5 - 1
    engine.submit(
        Work(
            job_id="L",
            kind="likelihood",
            model="tiny",
            params={"seed": 4, "curve": True},
            inputs={"images": images},
        )
    )
    outcome, (empty, extra) = rec.wait("L")
    assert outcome == "finished" and empty.numel() == 0
    noise = ImageNoise(4, range(2), (1, 8, 8), "cpu")
    ref = calc_bpd_loop(
        tiny_ckpt.unet,
        torch.from_numpy(images),
        schedule_of(tiny_ckpt),
        variance=Variance.BETA,
        noise_fn=lambda t: noise.randn(),
    )
    np.testing.assert_allclose(extra["bits_per_dim"], ref.total_bpd.numpy(), rtol=1e-5)
    np.testing.assert_allclose(extra["terms"]["prior"], ref.prior_bpd.numpy(), rtol=1e-5)
    np.testing.assert_allclose(extra["terms"]["decoder"], ref.decoder_bpd.numpy(), rtol=1e-5)
    np.testing.assert_allclose(extra["terms"]["diffusion"], ref.diffusion_bpd.numpy(), rtol=1e-5)
    curve = extra["curve"]
    assert len(curve["rate"][0]) == len(curve["distortion"][0]) == 40
    terms = extra["terms"]
    # Having x_1, the receiver has paid L_T + L_{T−1} + … + L_1 (Table 2's rate); having x_T, only L_T.
    np.testing.assert_allclose(curve["rate"][0][0], terms["prior"][0] + terms["diffusion"][0], rtol=1e-5)
    np.testing.assert_allclose(curve["rate"][0][-1], terms["prior"][0], rtol=1e-5)


def _start_order(rec) -> list[str]:
    return [event[1] for event in rec.events if event[0] == "started"]


# EASY backfilling, case by case: (policy, max_batch, jobs as (name, rows, steps) in queue order,
# the order they start in, forwards in all).
BACKFILL = {
    # `wide` runs; the head `wider` waits 10 steps for rows. `short` ends before that and goes first;
    # `long` would still hold its row at step 10 and delay the head, so it waits its turn.
    "a later job goes first only if it cannot delay the head": (
        "step",
        4,
        [("wide", 3, 10), ("wider", 4, 5), ("short", 1, 3), ("long", 1, 30)],
        ["wide", "short", "wider", "long"],
        10 + 5 + 30,
    ),
    # `one` outlasts the head's wait, but when `wide` ends six rows are free and the head needs three:
    # the spare row is `one`'s, so it goes first.
    "a later job may take rows the head will not need": (
        "step",
        6,
        [("wide", 4, 5), ("three", 3, 5), ("one", 1, 30)],
        ["wide", "one", "three"],
        30,
    ),
    "other policies keep strict queue order": (
        "request",
        4,
        [("wide", 3, 5), ("wider", 4, 5), ("short", 1, 2)],
        ["wide", "wider", "short"],
        5 + 5 + 2,
    ),
}


@pytest.mark.parametrize(
    ("policy", "max_batch", "jobs", "order", "forwards"), BACKFILL.values(), ids=BACKFILL
)
def test_admission_order(engine_factory, policy, max_batch, jobs, order, forwards):
    engine, rec = engine_factory(max_batch=max_batch, policy=policy)
    for seed, (name, rows, steps) in enumerate(jobs):
        engine.submit(sample_work(name, n=rows, steps=steps, seed=seed))
    engine.start()
    for name, _, _ in jobs:
        _images(rec, name)
    assert _start_order(rec) == order
    assert engine.forwards == forwards


def batch_sizes(engine) -> list[int]:
    """The batch size of each forward `engine` runs from now on, in order."""
    sizes: list[int] = []

    class Counting:
        def __init__(self, forward):
            self.forward = forward

        def __call__(self, x, t):
            sizes.append(len(x))
            return self.forward(x, t)

        def __getattr__(self, name):
            return getattr(self.forward, name)

    engine.forward = Counting(engine.forward)
    return sizes


@pytest.mark.parametrize(
    ("max_batch", "lambdas", "n", "sizes"),
    [
        # Decoding 4 λ after sampling 2 sources: its 4 rows are held from the start, so a 2-row job
        # waits rather than joining the 2-row phase and overflowing later.
        (4, [0.0, 0.3, 0.7, 1.0], 2, [2] * 40 + [4] * 5 + [2] * 40),
        # Decoding 1 λ: its widest phase is the first, the two seeded sources side by side.
        (2, [0.5], 1, [2] * 40 + [1] * 5 + [1] * 40),
    ],
)
def test_a_job_holds_its_widest_phase_so_the_batch_never_exceeds_max_batch(
    engine_factory, max_batch, lambdas, n, sizes
):
    """An interpolation from seeds samples its 2 sources first (40 steps), then decodes its λ (5)."""
    engine, rec = engine_factory(max_batch=max_batch)
    seen = batch_sizes(engine)
    params = {"t": [10], "lambdas": lambdas, "steps": 5, "seed": 1, "a_seed": 7, "b_seed": 8}
    engine.submit(Work(job_id="i", kind="interpolate", model="tiny", params={**params, "stream_every": 0}))
    engine.submit(sample_work("s", n=n, steps=40, seed=3))
    engine.start()
    _images(rec, "i")
    _images(rec, "s")
    assert seen == sizes and max(seen) == max_batch and _start_order(rec) == ["i", "s"]
