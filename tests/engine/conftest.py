import threading
from dataclasses import dataclass, field

import pytest

from app.engine.engine import Engine
from app.engine.work import Work
from app.nets import Checkpoint
from tests.tiny import tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt() -> Checkpoint:
    return tiny_checkpoint(timesteps=40, variance_type="fixed_large")


@dataclass
class Recorder:
    """A Listener that records every call, in order, and signals when a job ends."""

    events: list = field(default_factory=list)
    ended: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _end(self, job_id, outcome, payload=None):
        with self.lock:
            self.events.append((outcome, job_id))
            self.results[job_id] = (outcome, payload)
            self.ended.setdefault(job_id, threading.Event()).set()

    def on_started(self, job_id, steps):
        self.events.append(("started", job_id, steps))

    def on_progress(self, job_id, step, steps, t, x0, xt):
        self.events.append(("progress", job_id, step, steps, t, x0, xt))

    def on_finished(self, job_id, images, extra):
        self._end(job_id, "finished", (images, extra))

    def on_failed(self, job_id, code, message):
        self._end(job_id, "failed", (code, message))

    def on_cancelled(self, job_id):
        self._end(job_id, "cancelled")

    def wait(self, job_id, timeout=120):
        with self.lock:
            ev = self.ended.setdefault(job_id, threading.Event())
        assert ev.wait(timeout), f"{job_id} did not end"
        return self.results[job_id]

    def of(self, kind, job_id):
        return [e for e in self.events if e[0] == kind and e[1] == job_id]


@pytest.fixture
def engine_factory(tiny_ckpt):
    engines = []

    def make(max_batch=64, ckpt=None, **options):
        """An engine on `ckpt` (default: the shared tiny model); options: policy, fast."""
        rec = Recorder()
        engine = Engine(ckpt or tiny_ckpt, name="tiny", listener=rec, max_batch=max_batch, **options)
        engines.append(engine)
        return engine, rec

    yield make
    for e in engines:
        e.stop(10)


def sample_work(
    job_id,
    *,
    n=2,
    steps=40,
    sampler="ddpm",
    eta=0.0,
    variance="beta",
    clip=True,
    seed=0,
    stream_every=0,
    latents=None,
):
    inputs = {} if latents is None else {"latents": latents}
    return Work(
        job_id=job_id,
        kind="sample",
        model="tiny",
        params={
            "n": n,
            "steps": steps,
            "sampler": sampler,
            "eta": eta,
            "variance": variance,
            "clip_denoised": clip,
            "seed": seed,
            "stream_every": stream_every,
        },
        inputs=inputs,
    )


def fail_forward_once(engine: Engine, on_call: int, error: Exception) -> None:
    """Make `engine`'s U-Net forward raise `error` on its `on_call`-th call from now on (once), as out of
    device memory would: the other calls, and every attribute, are the real forward's."""
    forward, calls = engine.forward, [0]

    class FailsOnce:
        def __call__(self, x, t):
            calls[0] += 1
            if calls[0] == on_call:
                raise error
            return forward(x, t)

        def __getattr__(self, name):
            return getattr(forward, name)

    engine.forward = FailsOnce()
