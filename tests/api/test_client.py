"""app.client against a real server: jobs, streams with decoded previews, downloads, errors, retries."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from app.api import service
from app.client import AsyncClient, Client, DDPMError, Job, Progress
from tests.api.canned import canned_server
from tests.api.conftest import live_server, server_settings, wait_for

pytestmark = pytest.mark.service

KEY = "k" * 8 + "-client-tests"
LONG = {"n": 1, "steps": 1000, "stream_every": 0}  # ~10 s on a CPU core: stays running while we look


@pytest.fixture(scope="module")
def live(model_dirs):
    with live_server(server_settings(model_dirs, max_batch=4, max_images=4)) as server:
        yield server


@pytest.fixture
def ddpm(live):
    with Client(live.url, retries=0) as client:
        yield client


def test_stream_yields_decoded_previews_then_the_final_job(ddpm):
    job = ddpm.sample(2, steps=8, stream_every=1, seed=3, model="tiny2")
    assert isinstance(job, Job) and job.seed == 3 and job.kind == "sample" and job.steps == 8
    events = list(ddpm.stream(job))
    progress, final = events[:-1], events[-1]
    assert len(progress) >= 3 and all(isinstance(e, Progress) for e in progress)
    assert [e.step for e in progress] == sorted(e.step for e in progress) and progress[-1].step == 8
    assert all(len(e.x0) == 2 and e.x0[0].size == (8, 8) for e in progress)
    previews = [e.x0_array() for e in progress]
    assert previews[0].shape == (2, 1, 8, 8) and previews[0].dtype == np.float32
    assert previews[0].min() >= -1 and previews[0].max() <= 1
    assert len({p.tobytes() for p in previews}) >= 3  # x̂₀ changes as the chain runs
    assert isinstance(final, Job) and final.status == "succeeded" and final.done and final.image_count == 2


def test_images_download_as_floats_pil_images_and_a_grid(ddpm):
    job = ddpm.sample(3, steps=4, seed=5, model="tiny2", wait=True)
    assert job.status == "succeeded" and job.step == job.steps == 4
    floats = ddpm.images(job)
    assert floats.shape == (3, 1, 8, 8) and floats.dtype == np.float32
    pngs = ddpm.pil_images(job.id)  # by id: the client fetches the job to count its images
    assert len(pngs) == 3 and all(isinstance(p, Image.Image) and p.size == (8, 8) for p in pngs)
    # The PNGs are the 8-bit rounding of the floats (API.md's mapping).
    assert np.abs(np.asarray(pngs[1], dtype=np.float32) / 127.5 - 1 - floats[1, 0]).max() <= 1 / 127.5 + 1e-6
    grid = ddpm.grid(job)
    assert grid.size == (2 * 10 + 2, 2 * 10 + 2)  # 3 images tile 2 × 2 with 2-pixel gaps


def test_given_latents_are_where_ddim_starts(ddpm):
    latents = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    runs = [
        ddpm.images(ddpm.sample(2, steps=3, sampler="ddim", latents=latents, seed=seed, wait=True))
        for seed in (1, 2)
    ]
    assert np.allclose(runs[0], runs[1], atol=1e-6)  # DDIM with η = 0 is deterministic given x_T
    other = ddpm.images(ddpm.sample(2, steps=3, sampler="ddim", seed=1, wait=True))
    assert not np.allclose(runs[0], other, atol=1e-3)


def test_job_and_cancel_follow_a_running_job(live, ddpm):
    job = ddpm.sample(**LONG)
    with live.client() as http:
        running = wait_for(http, job.id, lambda j: j["status"] == "running")
    assert ddpm.job(job).status == running["status"] == "running"
    cancelled = ddpm.cancel(job)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert ddpm.job(job.id).status == "cancelled"
    assert list(ddpm.stream(job))[-1].status == "cancelled"


def test_interpolate_reconstruct_and_likelihood_return_typed_results(ddpm):
    sample = ddpm.sample(2, steps=3, seed=1, model="tiny2", wait=True)
    row = ddpm.interpolate((sample, 0), (sample, 1), model="tiny2", t=10, num=4, wait=True)
    assert row.status == "succeeded" and row.image_count == 4
    assert (row.result["rows"], row.result["columns"]) == (1, 4)
    seeded = ddpm.interpolate(7, ddpm.images(sample)[1], model="tiny2", t=5, num=2, wait=True)
    assert seeded.status == "succeeded" and seeded.params["a"] == {"seed": 7}
    assert seeded.params["b"] == {"image": True}
    again = ddpm.reconstruct(ddpm.pil_images(sample)[0], model="tiny2", t=5, n=2, seed=2, wait=True)
    assert again.status == "succeeded" and ddpm.images(again).shape == (2, 1, 8, 8)
    scored = ddpm.likelihood(ddpm.pil_images(sample), model="tiny2", wait=True)
    bound = scored.likelihood
    assert bound is not None and len(bound.bits_per_dim) == 2
    for download in (ddpm.images, ddpm.pil_images):  # numbers, no images: both say so (pil_images gave [])
        with pytest.raises(DDPMError) as caught:
            download(scored)
        assert (caught.value.status, caught.value.code) == (404, "no_images"), download
    total = np.add(np.add(bound.prior, bound.diffusion), bound.decoder)
    assert np.allclose(total, bound.bits_per_dim, rtol=1e-4) and min(bound.bits_per_dim) > 0


def test_the_async_client_does_the_same(live):
    async def run() -> tuple[list, np.ndarray, Job]:
        async with AsyncClient(live.url) as ddpm:
            job = await ddpm.sample(2, steps=5, stream_every=1, seed=3, model="tiny2")
            events = [event async for event in ddpm.stream(job)]
            images = await ddpm.images(job)
            return events, images, await ddpm.job(job.id)

    events, images, job = asyncio.run(run())
    assert sum(isinstance(e, Progress) for e in events) == 5 and events[-1].status == "succeeded"
    assert images.shape == (2, 1, 8, 8) and job.status == "succeeded"
    with Client(live.url) as ddpm:  # the same request, the same images, whichever client
        same = ddpm.sample(2, steps=5, seed=3, model="tiny2", wait=True)
        assert np.array_equal(ddpm.images(same), images)


class CuttingProxy:
    """A TCP proxy to `port` that cuts its first connection after `cut` bytes of the server's answer
    (mid-event), as a dropped network or a restarted proxy would; later connections pass whole.

    `resets`: the connections after the first are reset at once, unanswered, this many times (the
    replica restarting); `cap`: every connection is cut after `cut` bytes (a proxy that caps how much
    or how long one connection may carry)."""

    def __init__(self, port: int, cut: int, *, resets: int = 0, cap: bool = False):
        self.port, self.cut, self.resets, self.cap = port, cut, resets, cap
        self.requests: list[bytes] = []  # the head of each connection's first request
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.requests.append(b"")
            threading.Thread(target=self._serve, args=(conn, len(self.requests) - 1), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        if 1 <= index <= self.resets:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # an RST, no answer
            return
        cutting = index == 0 or self.cap
        with conn, socket.create_connection(("127.0.0.1", self.port)) as up:
            head = conn.recv(65536)
            self.requests[index] = head
            up.sendall(head)
            sent = 0
            while data := up.recv(4096):
                if cutting and sent + len(data) >= self.cut:
                    conn.sendall(data[: self.cut - sent])
                    return  # both sockets close: the client sees the stream end mid-message
                conn.sendall(data)
                sent += len(data)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def cutting(live) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy(int(live.url.rsplit(":", 1)[1]), cut=2500)
    yield proxy
    proxy.close()


async def _stream_async(url: str, job: Job, **settings) -> list:
    async with AsyncClient(url, **{"retries": 2, **settings}) as through:
        return [event async for event in through.stream(job)]


def _stream(kind: str, url: str, job: Job, **settings) -> list:
    if kind == "async":
        return asyncio.run(_stream_async(url, job, **settings))
    with Client(url, **settings) as through:
        return list(through.stream(job))


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_dropped_stream_resumes_after_the_last_event_with_nothing_lost_or_repeated(ddpm, cutting, kind):
    job = ddpm.sample(1, steps=12, stream_every=1, seed=4, model="tiny2", wait=True)
    if kind == "sync":
        with Client(cutting.url, retries=2) as through:
            events = list(through.stream(job))
    else:
        events = asyncio.run(_stream_async(cutting.url, job))
    steps = [e.step for e in events[:-1]]
    assert steps == list(range(1, 13)) and events[-1].status == "succeeded"
    assert len(cutting.requests) == 2, "the first connection was not cut mid-stream"
    first, resumed = (request.decode("latin-1").lower() for request in cutting.requests)
    assert first.startswith("get /stream/") and "last-event-id" not in first
    # The second asked for what came after the last whole event the first delivered: had it not, or
    # had the client yielded the event the cut tore, a step would be missing or repeated above.
    after = int(resumed.split("last-event-id: ")[1].split()[0])
    ids = [e.id for e in events[:-1]]
    assert after in ids[:-1]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_stream_keeps_reconnecting_while_the_server_restarts(ddpm, live, kind):
    # The first connection breaks mid-stream, the next two are reset unanswered (the replica is
    # restarting, as after a `shutdown` event): each failed reconnection is retried with back-off.
    job = ddpm.sample(1, steps=12, stream_every=1, seed=4, model="tiny2", wait=True)
    proxy = CuttingProxy(int(live.url.rsplit(":", 1)[1]), cut=2500, resets=2)
    try:
        events = _stream(kind, proxy.url, job, retries=3, backoff=0.05)
    finally:
        proxy.close()
    assert [e.step for e in events[:-1]] == list(range(1, 13)) and events[-1].status == "succeeded"
    assert len(proxy.requests) == 4  # cut, reset, reset, whole
    assert "last-event-id" in proxy.requests[3].decode("latin-1").lower()


def test_a_stream_that_never_reconnects_gives_up_after_the_retries(ddpm, live):
    job = ddpm.sample(1, steps=12, stream_every=1, seed=4, model="tiny2", wait=True)
    proxy = CuttingProxy(int(live.url.rsplit(":", 1)[1]), cut=2500, resets=99)
    try:
        with Client(proxy.url, retries=2, backoff=0.01) as through, pytest.raises(DDPMError) as caught:
            list(through.stream(job))
    finally:
        proxy.close()
    assert len(proxy.requests) == 3  # the cut one, then two tries
    assert (caught.value.status, caught.value.code, caught.value.attempts) == (0, "unreachable", 3)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_proxy_that_caps_every_connection_does_not_end_a_stream_that_progresses(ddpm, live, kind):
    # Each connection carries a few events and is cut: more connections than `retries` + 1 in all, but
    # never two in a row without an event, so the stream goes on to the end.
    job = ddpm.sample(1, steps=24, stream_every=1, seed=4, model="tiny2", wait=True)
    proxy = CuttingProxy(int(live.url.rsplit(":", 1)[1]), cut=1200, cap=True)
    try:
        events = _stream(kind, proxy.url, job, retries=1, backoff=0.01)
    finally:
        proxy.close()
    assert [e.step for e in events[:-1]] == list(range(1, 25)) and events[-1].status == "succeeded"
    assert len(proxy.requests) >= 4


def test_pil_images_of_a_job_that_has_not_succeeded_raise_as_images_and_grid_do(ddpm):
    job = ddpm.sample(**LONG)
    try:
        with pytest.raises(DDPMError) as caught:
            ddpm.pil_images(job)
        assert (caught.value.status, caught.value.code) == (409, "not_finished")
        assert "has not finished" in caught.value.message
    finally:
        ddpm.cancel(job)
    errors = []
    for download in (ddpm.pil_images, ddpm.images, ddpm.grid):
        with pytest.raises(DDPMError) as caught:
            download(job.id)
        errors.append((caught.value.status, caught.value.code, caught.value.message))
    assert errors[0] == errors[1] == errors[2]
    assert errors[0][2] == f"job {job.id} ended as cancelled; results exist once it has succeeded"


def test_a_redirect_is_an_error_that_says_where_the_server_is():
    with (
        canned_server(308, headers={"Location": "https://ddpm.example/models"}) as url,
        Client(url) as ddpm,
        pytest.raises(DDPMError) as caught,
    ):
        ddpm.models()
    assert (caught.value.status, caught.value.code) == (308, "redirect")
    said = str(caught.value)
    assert f"redirects {url}/models to https://ddpm.example/models; use https://ddpm.example" in said


@pytest.mark.parametrize(
    ("answer", "call", "fragment"),
    [
        ((b'{"hello": "world"}', "application/json"), lambda c: c.job("abc"), "KeyError: 'id'"),
        ((b'{"hello": "world"}', "application/json"), lambda c: c.models(), "TypeError"),
        ((b"<html>login</html>", "text/html"), lambda c: c.sample(1), "JSONDecodeError"),
        ((b"<html>login</html>", "text/html"), lambda c: c.grid("abc"), "UnidentifiedImageError"),
        ((b"<html>login</html>", "text/html"), lambda c: list(c.stream("abc")), "not an event stream"),
    ],
    ids=["job", "models", "sample", "grid", "stream"],
)
def test_an_answer_that_is_not_the_apis_is_a_bad_response(answer, call, fragment):
    body, kind = answer
    with (
        canned_server(200, body, {"Content-Type": kind}) as url,
        Client(url, retries=0) as ddpm,
        pytest.raises(DDPMError) as caught,
    ):
        call(ddpm)
    assert (caught.value.status, caught.value.code) == (200, "bad_response")
    assert f"the answer of {url}/" in caught.value.message and fragment in caught.value.message
    assert f"is {url} a ddpm-serve server, of a version this client knows?" in caught.value.message


def test_the_async_client_reads_redirects_and_foreign_answers_alike():
    async def call(url: str) -> None:
        async with AsyncClient(url) as ddpm:
            await ddpm.job("abc")

    with canned_server(301, headers={"Location": "https://ddpm.example/jobs/abc"}) as url:
        with pytest.raises(DDPMError) as caught:
            asyncio.run(call(url))
        assert caught.value.code == "redirect" and "use https://ddpm.example" in caught.value.message
    with canned_server(200, b"[]", {"Content-Type": "application/json"}) as url:
        with pytest.raises(DDPMError) as caught:
            asyncio.run(call(url))
        assert caught.value.code == "bad_response"


@pytest.mark.parametrize(
    ("call", "status", "code", "fragment"),
    [
        (lambda c: c.job("no-such-job"), 404, "not_found", "not found"),
        (lambda c: c.sample(0), 422, "validation_error", "n:"),
        (lambda c: c.sample(9), 422, "validation_error", "at most 4 images"),
        (lambda c: c.sample(1, model="nope"), 404, "unknown_model", "no model 'nope'"),
        (lambda c: c.sample(1, sampler="ddpm", eta=0.5), 422, "validation_error", "eta"),
        (lambda c: c.images("no-such-job"), 404, "not_found", "not found"),
    ],
)
def test_api_errors_are_raised_with_the_apis_code_and_message(ddpm, call, status, code, fragment):
    with pytest.raises(DDPMError) as caught:
        call(ddpm)
    error = caught.value
    assert (error.status, error.code) == (status, code) and fragment in error.message
    assert fragment in str(error) and str(status) in str(error)


def test_an_unreachable_server_is_a_clear_error():
    with Client("http://127.0.0.1:9", retries=3) as ddpm, pytest.raises(DDPMError) as caught:
        ddpm.models()
    assert caught.value.status == 0 and "cannot reach http://127.0.0.1:9" in str(caught.value)


def test_a_full_queue_is_retried_after_retry_after_then_given_up_or_admitted(model_dirs, monkeypatch):
    monkeypatch.setattr(service, "RETRY_AFTER_SECONDS", 1)
    settings = server_settings(model_dirs[:1], max_batch=1, max_queued_jobs=1)
    with live_server(settings) as live, live.client() as http, Client(live.url, retries=1) as ddpm:
        running = ddpm.sample(**LONG)
        wait_for(http, running.id, lambda job: job["status"] == "running")
        queued = ddpm.sample(**LONG)

        delays: list[float | None] = []
        own_delay = ddpm._delay
        monkeypatch.setattr(ddpm, "_delay", lambda *a: delays.append(own_delay(*a)) or delays[-1])
        start = time.monotonic()
        with pytest.raises(DDPMError) as caught:  # one retry, after the 1 s the server asked for
            ddpm.sample(1, steps=1)
        assert time.monotonic() - start >= 0.95  # it did wait
        assert delays == [1.0, None]  # the Retry-After asked for, then no more retries
        assert (caught.value.status, caught.value.code, caught.value.attempts) == (429, "queue_full", 2)
        assert "already waiting" in str(caught.value) and "after 2 attempts" in str(caught.value)

        # Room appears while the client waits: its retry is admitted. The room is made from inside the
        # client's wait, so the first attempt is refused and the retry comes after it, however slow.
        with Client(live.url, retries=5) as patient:
            waits: list[float | None] = []
            patient_delay = patient._delay

            def delay_then_make_room(*args) -> float | None:
                waits.append(patient_delay(*args))
                if len(waits) == 1:
                    ddpm.cancel(queued)
                return waits[-1]

            monkeypatch.setattr(patient, "_delay", delay_then_make_room)
            admitted = patient.sample(1, steps=1)
        assert waits == [1.0]  # refused once, waited the Retry-After, then admitted
        assert admitted.status in ("queued", "running")
        for job in (admitted, running):
            ddpm.cancel(job)


def test_the_api_key_comes_from_the_environment(model_dirs, monkeypatch):
    monkeypatch.delenv("DDPM_API_KEY", raising=False)
    with live_server(server_settings(model_dirs[:1], api_keys=[KEY])) as live:
        with Client(live.url) as anonymous, pytest.raises(DDPMError) as caught:
            anonymous.models()
        assert (caught.value.status, caught.value.code) == (401, "unauthorized")
        assert "missing API key" in caught.value.message
        monkeypatch.setenv("DDPM_API_KEY", KEY)
        with Client(live.url) as keyed:
            assert [(m.name, m.timesteps, m.max_steps) for m in keyed.models()] == [("tiny", 1000, 1000)]
            job = keyed.sample(1, steps=2, stream_every=1)
            assert list(keyed.stream(job))[-1].status == "succeeded"  # the stream sends the key too
