"""POST /sample, jobs, downloads, cancellation and the SSE stream, against a real server over HTTP."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.api.conftest import live_server, metric, read_sse, server_settings, wait_done, wait_for
from tests.tiny import BATCH_ATOL

pytestmark = pytest.mark.service

LONG = {"n": 1, "steps": 1000, "stream_every": 0}  # ~10 s on a CPU core: long enough to catch running


@pytest.fixture(scope="module")
def live(model_dirs):
    settings = server_settings(
        model_dirs,
        max_batch=2,
        max_images=4,
        max_body_bytes=64 * 1024,
        heartbeat_seconds=0.5,
        max_streams_per_key=2,
    )
    with live_server(settings) as server:
        yield server


@pytest.fixture
def client(live):
    with live.client() as c:
        yield c


def post_sample(client: httpx.Client, **body) -> dict:
    response = client.post("/sample", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# Creating and polling


def test_sample_answers_202_at_once_then_the_job_succeeds(client):
    response = client.post("/sample", json={"n": 2, "steps": 5, "seed": 1})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] in ("queued", "running") and job["kind"] == "sample" and job["model"] == "tiny"
    assert job["seed"] == 1 and job["progress"]["steps"] == 5
    assert job["params"]["variance"] == "beta"  # "model" resolved to the checkpoint's fixed_large
    assert job["urls"] == {"self": f"/jobs/{job['id']}", "stream": f"/stream/{job['id']}"}
    done = wait_done(client, job["id"])
    assert done["status"] == "succeeded" and done["progress"] == {"step": 5, "steps": 5}
    assert done["started_at"] and done["finished_at"] and done["error"] is None
    assert [image["url"] for image in done["result"]["images"]] == [
        f"/jobs/{job['id']}/images/0.png",
        f"/jobs/{job['id']}/images/1.png",
    ]
    assert done["result"]["grid_url"] == f"/jobs/{job['id']}/grid.png"


def test_a_seed_is_chosen_and_reported_when_none_is_given(client):
    first, second = post_sample(client, steps=2), post_sample(client, steps=2)
    assert isinstance(first["seed"], int) and first["seed"] != second["seed"]


def test_wait_true_answers_200_with_the_finished_job(client):
    response = client.post("/sample", params={"wait": "true"}, json={"n": 1, "steps": 4})
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded" and response.json()["result"]["images"]
    assert response.headers["location"] == f"/jobs/{response.json()['id']}"
    assert "preference-applied" not in response.headers  # no Prefer header was sent


def test_a_prefer_wait_that_is_not_ascii_digits_is_ignored(client):
    response = client.post("/sample", headers={"Prefer": "wait=\u00b2".encode("latin-1")}, json={"steps": 1})
    assert response.status_code == 202


def test_prefer_wait_holds_at_most_n_seconds(client):
    start = time.monotonic()
    response = client.post("/sample", headers={"Prefer": "wait=1"}, json=LONG)
    elapsed = time.monotonic() - start
    job = response.json()
    assert response.status_code == 200 and job["status"] in ("queued", "running")
    assert 0.9 < elapsed < 5
    assert response.headers["preference-applied"] == "wait=1"  # RFC 7240
    assert response.headers["location"] == f"/jobs/{job['id']}"  # where to look for the rest
    assert client.delete(f"/jobs/{job['id']}").json()["status"] == "cancelled"


def test_a_waiting_post_stops_waiting_when_its_client_goes_away(live, client):
    """The job goes on (it can be fetched later); only the request's wait ends, within a poll or two."""
    host, port = live.url.removeprefix("http://").split(":")
    body = json.dumps({**LONG, "seed": 11}).encode()
    head = f"POST /sample?wait=true HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    waiting = lambda: metric(client.get("/metrics").text, "ddpm_waiting_requests")  # noqa: E731
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while waiting() < 1:
            assert time.monotonic() < deadline, "the request never started waiting"
            time.sleep(0.05)
    deadline = time.monotonic() + 15  # polls every 0.5 s; generous for a CPU busy with other work
    while waiting() > 0:
        assert time.monotonic() < deadline, "the request went on waiting for a client that left"
        time.sleep(0.05)
    running = metric(client.get("/metrics").text, "ddpm_engine_slots", model="tiny", state="running")
    assert running == 1  # the job itself goes on, to the end (so the wait did not just last the job)
    done = lambda: metric(client.get("/metrics").text, "ddpm_jobs_total", kind="sample", outcome="succeeded")  # noqa: E731
    before, deadline = done(), time.monotonic() + 120
    while done() == before:
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.2)


# Downloads


def test_images_download_as_png_and_npy_with_the_right_shapes(client):
    job = client.post("/sample", params={"wait": "true"}, json={"n": 3, "steps": 3, "seed": 4}).json()
    base = f"/jobs/{job['id']}"
    batch = decode_npy(client.get(f"{base}/images.npy").content)
    assert batch.shape == (3, 1, 8, 8) and batch.dtype == np.float32
    assert batch.min() >= -1 and batch.max() <= 1
    for k in range(3):
        png = client.get(f"{base}/images/{k}.png")
        assert png.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(png.content))
        assert (image.size, image.mode) == ((8, 8), "L")
        one = decode_npy(client.get(f"{base}/images/{k}.npy").content)
        assert one.shape == (1, 1, 8, 8) and np.array_equal(one[0], batch[k])
        # API.md's mapping: round((x + 1) * 127.5) clipped to 0..255
        expected = np.clip(np.round((batch[k, 0] + 1) * 127.5), 0, 255).astype(np.uint8)
        assert np.array_equal(np.asarray(image), expected)
    grid = Image.open(io.BytesIO(client.get(f"{base}/grid.png").content))
    assert grid.size[0] >= 2 * 8 and grid.size[1] >= 2 * 8


def test_output_npy_links_the_npy_downloads(client):
    job = client.post("/sample", params={"wait": "true"}, json={"n": 2, "steps": 2, "output": "npy"}).json()
    urls = [image["url"] for image in job["result"]["images"]]
    assert urls == [f"/jobs/{job['id']}/images/0.npy", f"/jobs/{job['id']}/images/1.npy"]
    assert decode_npy(client.get(urls[1]).content).shape == (1, 1, 8, 8)


def test_an_image_index_out_of_range_is_404_and_a_non_number_422(client):
    job = client.post("/sample", params={"wait": "true"}, json={"n": 1, "steps": 2}).json()
    for path in ("images/1.png", "images/-1.npy"):
        error = error_of(client.get(f"/jobs/{job['id']}/{path}"), 404)
        assert error["code"] == "no_such_image"  # the job exists: not "unknown or expired"
        assert f"job {job['id']} has images 0..0, not image" in error["message"]
    response = client.get(f"/jobs/{job['id']}/images/first.png")
    assert response.status_code == 422 and "index" in response.json()["error"]["message"]


def test_downloads_before_the_job_is_done_are_409(client):
    job = post_sample(client, **LONG)
    for path in ("images/0.png", "images/0.npy", "grid.png", "images.npy"):
        response = client.get(f"/jobs/{job['id']}/{path}")
        assert response.status_code == 409, path
        assert response.json()["error"]["code"] == "not_finished"
    client.delete(f"/jobs/{job['id']}")


# Determinism


def test_same_seed_same_images_and_image_k_does_not_depend_on_n(client):
    def images(n: int, seed: int) -> np.ndarray:
        body = {"n": n, "steps": 4, "seed": seed}
        job = client.post("/sample", params={"wait": "true"}, json=body).json()
        return decode_npy(client.get(f"/jobs/{job['id']}/images.npy").content)

    two = images(2, seed=11)
    np.testing.assert_allclose(images(2, seed=11), two, atol=1e-5)
    np.testing.assert_allclose(images(1, seed=11)[0], two[0], atol=BATCH_ATOL)
    assert np.abs(images(1, seed=12)[0] - two[0]).max() > 0.1


def test_concurrent_jobs_share_forward_passes_and_keep_their_images(live, client):
    def run(body: dict) -> dict:
        return client.post("/sample", params={"wait": "true"}, json=body).json()

    def images(job: dict) -> np.ndarray:
        return decode_npy(client.get(f"/jobs/{job['id']}/images.npy").content)

    # 200 steps: the first job must still run when the second arrives (20 took under 40 ms on a fast CPU,
    # about the time of the second POST, and then ran alone)
    body = {"n": 1, "steps": 200, "seed": 21, "stream_every": 0}
    alone = images(run(body))
    before = forwards(client)
    with live.client() as other:
        first = post_sample(client, **body)
        second = other.post("/sample", json={**body, "seed": 22}).json()
        jobs = [wait_done(client, first["id"]), wait_done(client, second["id"])]
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"]
    # two 200-step chains, batched: fewer forwards than 200 + 200, and at least the 200 of the longer one
    assert 200 <= forwards(client) - before < 400
    np.testing.assert_allclose(images(jobs[0]), alone, atol=BATCH_ATOL)  # unchanged by its neighbour


def test_given_latents_are_the_starting_point(client):
    x_T = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, x_T)
    latents = base64.b64encode(buf.getvalue()).decode()
    body = {"n": 2, "steps": 3, "sampler": "ddim", "clip_denoised": False, "latents": latents}
    runs = []
    for seed in (1, 2):  # DDIM with η = 0 uses no noise: only x_T matters, not the seed
        job = client.post("/sample", params={"wait": "true"}, json={**body, "seed": seed}).json()
        assert job["params"]["latents"] is True
        runs.append(decode_npy(client.get(f"/jobs/{job['id']}/images.npy").content))
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-5)


@pytest.mark.parametrize("value", [1e30, -1001.0])
def test_latents_far_outside_n_0_i_are_refused_before_a_job_starts(client, value):
    buf = io.BytesIO()
    np.save(buf, np.full((1, 1, 8, 8), value, np.float32))
    body = {"n": 1, "steps": 2, "latents": base64.b64encode(buf.getvalue()).decode()}
    error = error_of(client.post("/sample", json=body), 422)
    assert error["details"][0]["field"] == "latents"
    assert "values must lie within ±1000" in error["message"] and "N(0, I)" in error["message"]
    schema = client.get("/openapi.json").json()["components"]["schemas"]["SampleRequest"]
    assert "within ±1000" in schema["properties"]["latents"]["description"]


# Cancellation


def forwards(client: httpx.Client) -> float:
    return metric(client.get("/metrics").text, "ddpm_engine_forwards_total", model="tiny")


def test_cancel_a_queued_and_a_running_job(client):
    start = forwards(client)
    running = post_sample(client, n=2, steps=1000, stream_every=0)  # fills both slots (max_batch=2)
    wait_for(client, running["id"], lambda job: job["status"] == "running")
    # The counter moves while the job runs, so that its standing still after the cancel means something.
    deadline = time.monotonic() + 30
    while forwards(client) == start:
        assert time.monotonic() < deadline, "no forward pass was counted"
        time.sleep(0.02)
    queued = post_sample(client, n=1, steps=5)
    assert client.get(f"/jobs/{queued['id']}").json()["queue_position"] == 1

    cancelled = client.delete(f"/jobs/{queued['id']}").json()
    assert cancelled["status"] == "cancelled" and cancelled["started_at"] is None

    stopped = client.delete(f"/jobs/{running['id']}").json()
    assert stopped["status"] == "cancelled" and stopped["progress"]["step"] < 1000
    before = forwards(client)
    time.sleep(0.3)  # ~30 steps' worth: none may run once the answer came
    assert forwards(client) == before
    assert client.get(f"/jobs/{running['id']}/images/0.png").status_code == 409


def test_deleting_a_job_whose_end_is_being_recorded_answers_its_end(live, client, monkeypatch):
    # The engine has finished the job but its images are still being encoded: nothing runs it any more,
    # yet it is not cancelled, and the answer must be what it ended as (it used to be "cancelled",
    # with its results stored but never downloadable).
    import app.jobs.runner as runner_module

    encode = runner_module.result_blobs

    def slow(*args, **kwargs):
        time.sleep(4)  # longer than the two 1 s looks of a cancel that finds no running job
        return encode(*args, **kwargs)

    monkeypatch.setattr(runner_module, "result_blobs", slow)
    runner = live.app.state.service.dispatcher.runner
    job = post_sample(client, n=1, steps=2)
    deadline = time.monotonic() + 30
    while not runner.ending(job["id"]):
        assert time.monotonic() < deadline, "the engine did not finish the job"
        time.sleep(0.01)
    response = client.delete(f"/jobs/{job['id']}")
    assert response.status_code == 200 and response.json()["status"] == "succeeded", response.text
    assert client.get(f"/jobs/{job['id']}/images/0.png").status_code == 200
    assert not runner.ending(job["id"])


def test_deleting_a_finished_job_answers_its_final_status(client):
    job = client.post("/sample", params={"wait": "true"}, json={"n": 1, "steps": 2}).json()
    response = client.delete(f"/jobs/{job['id']}")
    assert response.status_code == 200 and response.json()["status"] == "succeeded"


# Server-Sent Events


def stream(client: httpx.Client, job_id: str, *, headers=None, params=None, comments=None) -> list:
    with client.stream("GET", f"/stream/{job_id}", headers=headers or {}, params=params) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(read_sse(response, comments=comments))


def test_stream_sends_progress_then_done_with_the_final_job(client):
    job = post_sample(client, n=2, steps=6, stream_every=1, seed=3)
    events = stream(client, job["id"])
    progress = [e for e in events if e.event == "progress"]
    assert len(progress) >= 3
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [e.data["step"] for e in progress] == sorted(e.data["step"] for e in progress)
    first = progress[0].data
    assert first["steps"] == 6 and 0 <= first["t"] < 1000 and len(first["x0"]) == 2 and "xt" not in first
    assert Image.open(io.BytesIO(base64.b64decode(first["x0"][0]))).size == (8, 8)
    assert events[-1].event == "done"
    assert events[-1].data["id"] == job["id"] and events[-1].data["status"] == "succeeded"
    assert events[-1].data["result"]["grid_url"] == f"/jobs/{job['id']}/grid.png"


def test_a_late_subscriber_gets_the_whole_replay_at_once(live, client, monkeypatch):
    """A job that has ended streams its events and closes: nothing waits for a live event or a heartbeat
    tick. With the heartbeat an hour away, a stream that waited would send a comment or stay open, and
    the read timeout (a hang guard, far above any replay) ends the test."""
    job = client.post("/sample", params={"wait": "true"}, json={"n": 1, "steps": 4, "stream_every": 1}).json()
    monkeypatch.setattr(live.app.state.settings, "heartbeat_seconds", 3600.0)
    comments: list[str] = []
    with live.client() as reader:
        reader.timeout = httpx.Timeout(60, read=30)
        events = stream(reader, job["id"], comments=comments)
    assert comments == []
    assert [e.event for e in events] == ["progress"] * 4 + ["done"]
    assert [e.data["step"] for e in events[:4]] == [1, 2, 3, 4]


def test_last_event_id_resumes_after_that_event(client):
    job = client.post("/sample", params={"wait": "true"}, json={"n": 1, "steps": 5, "stream_every": 1}).json()
    everything = stream(client, job["id"])
    resumed = stream(client, job["id"], headers={"Last-Event-ID": str(everything[2].id)})
    assert [e.id for e in resumed] == [e.id for e in everything[3:]]
    # Not a number, a digit Python's int() refuses ("²" in Latin-1), more digits than int() reads
    for value in (b"soon", "\u00b2".encode("latin-1"), b"9" * 5000):
        bad = client.get(f"/stream/{job['id']}", headers={"Last-Event-ID": value})
        assert bad.status_code == 422 and "Last-Event-ID" in bad.json()["error"]["message"]
    # After the last event (done): nothing more to send. Past it (events the server lost, e.g. a Redis
    # restarted without its last writes): the end again, not an empty stream the client cannot read.
    last = everything[-1].id
    assert stream(client, job["id"], headers={"Last-Event-ID": str(last)}) == []
    beyond = stream(client, job["id"], headers={"Last-Event-ID": str(last + 5)})
    assert [(e.id, e.event, e.data["status"]) for e in beyond] == [(last, "done", "succeeded")]


def test_a_last_event_id_past_a_running_jobs_events_follows_it_to_its_end(live, client):
    job = post_sample(client, **LONG)  # stream_every 0: no event until its end
    with live.client() as other:

        def cancel_soon() -> None:
            time.sleep(1.0)
            other.delete(f"/jobs/{job['id']}")

        threading.Thread(target=cancel_soon).start()
        events = stream(client, job["id"], headers={"Last-Event-ID": "3"})
    assert [(e.event, e.data["status"]) for e in events] == [("done", "cancelled")]


def test_xt_previews_only_when_asked(client):
    job = client.post("/sample", params={"wait": "true"}, json={"n": 2, "steps": 2, "stream_every": 1}).json()
    progress = [e for e in stream(client, job["id"], params={"xt": "true"}) if e.event == "progress"]
    assert progress and all(len(e.data["xt"]) == 2 for e in progress)


def test_an_idle_stream_sends_heartbeats_and_ends_when_the_job_is_cancelled(live, client):
    job = post_sample(client, **LONG)
    comments: list[str] = []
    with live.client() as other:

        def cancel_soon() -> None:
            time.sleep(1.3)
            other.delete(f"/jobs/{job['id']}")

        threading.Thread(target=cancel_soon).start()
        events = stream(client, job["id"], comments=comments)
    assert len(comments) >= 2  # heartbeat_seconds = 0.5
    assert events[-1].event == "done" and events[-1].data["status"] == "cancelled"


def test_too_many_streams_from_one_address_is_429(live, client):
    job = post_sample(client, **LONG)
    with (
        live.client() as a,
        live.client() as b,
        a.stream("GET", f"/stream/{job['id']}") as first,
        b.stream("GET", f"/stream/{job['id']}") as second,
    ):
        assert first.status_code == second.status_code == 200
        refused = client.get(f"/stream/{job['id']}")
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert refused.json()["error"]["code"] == "too_many_streams"
        assert refused.json()["error"]["message"].startswith("this address has 2 streams open")
        # Without API keys the limit is per client address: another host is not shut out.
        other_host = httpx.HTTPTransport(local_address="127.0.0.2")
        with (
            httpx.Client(base_url=live.url, transport=other_host, timeout=60) as other,
            other.stream("GET", f"/stream/{job['id']}") as third,
        ):
            assert third.status_code == 200
    # Both closed: a new stream is accepted again.
    for _ in range(50):
        with client.stream("GET", f"/stream/{job['id']}") as again:
            if again.status_code == 200:
                break
        time.sleep(0.05)
    assert again.status_code == 200
    client.delete(f"/jobs/{job['id']}")


# Errors


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"n": "4"}, "n"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),  # over max_images = 4
        ({"steps": 1001}, "steps"),  # over T = 1000
        ({"steps": 0}, "steps"),
        ({"sampler": "euler"}, "sampler"),
        ({"eta": 2}, "eta"),
        ({"clip_denoised": "yes"}, "clip_denoised"),
        ({"seed": -1}, "seed"),
        ({"output": "gif"}, "output"),
        ({"stream_every": -1}, "stream_every"),
        ({"colour": "red"}, "colour"),
        ({"latents": "AAAA"}, "latents"),
    ],
)
def test_invalid_requests_are_422_naming_the_field(client, body, field):
    error = error_of(client.post("/sample", json=body), 422)
    assert error["code"] == "validation_error" and field in error["message"]


def test_options_of_the_other_sampler_are_refused(client):
    assert "eta" in error_of(client.post("/sample", json={"sampler": "ddpm", "eta": 0.5}), 422)["message"]
    body = {"sampler": "ddim", "variance": "beta"}
    assert "variance" in error_of(client.post("/sample", json=body), 422)["message"]


@pytest.mark.parametrize(
    "body",
    [
        b"{n: 4",  # a syntax error
        b'{"model": "\xff"}',  # not UTF-8
        b'{"n": ' + b"9" * 5000 + b"}",  # past Python's 4,300-digit limit on int()
        b"[" * 20_000 + b"]" * 20_000,  # past the recursion limit
    ],
)
def test_a_body_that_is_not_json_is_422(client, body):
    response = client.post("/sample", content=body, headers={"content-type": "application/json"})
    error = error_of(response, 422)
    assert error["code"] == "validation_error" and "not valid JSON" in error["message"]
    assert error["details"][0]["field"] == "body"


@pytest.mark.parametrize(
    ("content", "content_type"),
    [(b"n=4", "application/x-www-form-urlencoded"), (b"n 4", "text/plain"), (b"[4]", "application/json")],
)
def test_a_body_that_is_not_a_json_object_is_422_naming_the_content_type(client, content, content_type):
    response = client.post("/sample", content=content, headers={"content-type": content_type})
    assert "Content-Type: application/json" in error_of(response, 422)["message"]


def test_unknown_ids_and_models_are_404(client):
    for path in ("/jobs/nope", "/jobs/nope/images/0.png", "/jobs/nope/grid.png", "/stream/nope"):
        error_of(client.get(path), 404)
    error_of(client.delete("/jobs/nope"), 404)
    error = error_of(client.post("/sample", json={"model": "mnist"}), 404)
    assert "tiny" in error["message"] and "tiny2" in error["message"]


def test_a_body_over_the_limit_is_413_whether_declared_or_streamed(client):
    big = {"n": 1, "latents": "A" * (70 * 1024)}
    error = error_of(client.post("/sample", json=big), 413)
    assert "65536" in error["message"]

    def chunks():
        yield b'{"latents": "'
        for _ in range(80):
            yield b"A" * 1024
        yield b'"}'

    error_of(client.post("/sample", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_unknown_routes_and_methods_keep_the_error_shape(client):
    error_of(client.get("/nowhere"), 404)
    error_of(client.put("/sample", json={}), 405)


def test_a_bug_in_a_route_is_a_500_in_the_error_shape_without_its_details(live, client, monkeypatch):
    async def broken(*args, **kwargs):
        raise RuntimeError("a secret detail of the bug")

    monkeypatch.setattr(live.app.state.service.store, "get", broken)
    response = client.get("/jobs/anything")
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    message = "internal server error; the server log has the details"
    assert response.json() == {"error": {"code": "internal", "message": message}}
    for leak in ("Traceback", "RuntimeError", "secret", "File "):
        assert leak not in response.text
    assert response.headers.get_list("x-content-type-options") == ["nosniff"]  # answered outside middleware


# Models, health, metrics, docs


def test_models_lists_both_with_their_training_setup(client):
    models = client.get("/models").json()
    assert [m["name"] for m in models] == ["tiny", "tiny2"]
    tiny, tiny2 = models
    assert tiny["default"] is True and tiny2["default"] is False
    assert (tiny["resolution"], tiny["channels"], tiny["timesteps"], tiny["variance"]) == (8, 1, 1000, "beta")
    assert (tiny2["timesteps"], tiny2["variance"], tiny2["beta_schedule"]) == (100, "posterior", "linear")
    assert (tiny["max_steps"], tiny2["max_steps"]) == (1000, 100)  # no DDPM_MAX_STEPS: T
    assert tiny["parameters"] > 100_000 and tiny["source"].endswith("tiny")


def test_a_request_can_pick_the_second_model(client):
    job = client.post("/sample", params={"wait": "true"}, json={"model": "tiny2", "steps": 3}).json()
    assert (
        job["model"] == "tiny2" and job["params"]["variance"] == "posterior" and job["status"] == "succeeded"
    )
    assert "100" in error_of(client.post("/sample", json={"model": "tiny2", "steps": 101}), 422)["message"]
    unknown = error_of(client.post("/sample", json={"model": "nope"}), 404)
    assert unknown["code"] == "unknown_model" and "'nope'" in unknown["message"]
    too_long = client.post("/sample", json={"model": "x" * 300})  # not echoed back at any length
    assert too_long.status_code == 422 and "x" * 201 not in too_long.text


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == ["tiny", "tiny2"]


def test_metrics_expose_requests_jobs_and_engine(live, client):
    """The registry is the process's, shared with every earlier test: exact increases over one request,
    once nothing else runs."""
    dispatcher = live.app.state.service.dispatcher
    deadline = time.monotonic() + 60
    while any(e.running or e.queued for e in dispatcher.pool.engines.values()) or dispatcher.runner._tails:
        assert time.monotonic() < deadline, "an earlier test's job is still running"
        time.sleep(0.02)
    samples = [
        ("ddpm_http_request_duration_seconds_count", {"route": "/sample", "method": "POST", "status": "200"}),
        ("ddpm_jobs_total", {"kind": "sample", "outcome": "succeeded"}),
        ("ddpm_jobs_total", {"kind": "sample", "outcome": "failed"}),
        ("ddpm_jobs_total", {"kind": "sample", "outcome": "cancelled"}),
        ("ddpm_images_total", {"model": "tiny"}),
        ("ddpm_engine_forwards_total", {"model": "tiny"}),
        ("ddpm_engine_batch_size_count", {"model": "tiny"}),
        ("ddpm_engine_batch_size_sum", {"model": "tiny"}),
        ("ddpm_engine_step_seconds_count", {"model": "tiny"}),
        ("ddpm_queue_wait_seconds_count", {"kind": "sample"}),
        ("ddpm_job_duration_seconds_count", {"kind": "sample"}),
    ]

    def read() -> tuple[str, list[float]]:
        text = client.get("/metrics").text
        return text, [metric(text, name, **labels) for name, labels in samples]

    _, before = read()
    job = client.post("/sample", params={"wait": "true"}, json={"n": 2, "steps": 3, "stream_every": 0})
    assert job.status_code == 200 and job.json()["status"] == "succeeded", job.text
    # The request's own latency is observed once its answer has been sent: read until it is there.
    text, after = read()
    while after[0] == before[0]:
        assert time.monotonic() < deadline, "the POST was never observed"
        time.sleep(0.02)
        text, after = read()
    increase = [round(a - b, 6) for a, b in zip(after, before, strict=True)]
    # one request; one job, succeeded; its 2 images; 3 steps, each one forward of both rows
    assert increase == [1, 1, 0, 0, 2, 3, 3, 6, 3, 1, 1], list(zip(samples, increase, strict=True))
    assert metric(text, "ddpm_model_load_seconds", model="tiny") > 0
    assert metric(text, "ddpm_process_resident_memory_bytes") > 0


def test_every_metric_name_starts_with_ddpm(client):
    names = {
        line.split()[2] for line in client.get("/metrics").text.splitlines() if line.startswith("# TYPE")
    }
    assert names and all(name.startswith("ddpm_") for name in names), sorted(names)


def test_openapi_documents_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/sample",
        "/jobs/{job_id}",
        "/jobs/{job_id}/grid.png",
        "/stream/{job_id}",
        "/models",
        "/readyz",
    ):
        assert path in paths
    assert client.get("/docs").status_code == 200
