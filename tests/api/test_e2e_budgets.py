"""Budgets against denial of service, over real HTTP (embedded mode): the bytes of previews a job stores,
each API key's share of the queue, and the bytes uploads decode to."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from app.jobs.encoding import npy_bytes
from app.jobs.previews import EXHAUSTED
from tests.api.conftest import live_server, png_b64, read_sse, server_settings, wait_done, wait_for

pytestmark = pytest.mark.service

KEY_A, KEY_B = "a" * 8 + "-key-for-alice", "b" * 8 + "-key-for-bobby"
LONG = {"n": 1, "steps": 1000, "stream_every": 0}
IMAGE_BYTES = 1 * 8 * 8 * 4  # a tiny model's image as float32


@pytest.fixture(scope="module")
def budgeted(model_dirs):
    settings = server_settings(model_dirs[:1], max_preview_bytes=8000, max_input_bytes=3 * IMAGE_BYTES)
    with live_server(settings) as live:
        yield live


def test_a_jobs_previews_stop_carrying_images_at_its_budget_while_progress_goes_on(budgeted):
    with budgeted.client() as client:
        job = client.post("/sample", json={"n": 8, "steps": 40, "seed": 3, "stream_every": 1}).json()
        wait_done(client, job["id"])
        with client.stream("GET", f"/stream/{job['id']}", params={"xt": "true"}) as response:
            events = list(read_sse(response))
    previews = [e.data for e in events if e.event == "progress"]
    assert events[-1].event == "done" and [p["step"] for p in previews] == list(range(1, 41))
    stored = sum(len(text) for p in previews for text in p["x0"] + p.get("xt", []))
    assert 0 < stored <= 8000
    assert sum(len(text) for p in previews for text in p.get("xt", [])) <= 4000
    assert previews[0]["x0"] and "xt" in previews[0]
    assert previews[-1]["x0"] == [] and previews[-1][EXHAUSTED] is True
    assert len(client_images(budgeted, job["id"])) == 8  # the results are whole


def client_images(live, job_id: str) -> list:
    with live.client() as client:
        return client.get(f"/jobs/{job_id}").json()["result"]["images"]


def test_uploads_that_decode_past_the_input_budget_are_413_naming_it(budgeted):
    with budgeted.client() as client:
        refused = client.post("/likelihood", json={"images": [png_b64(k) for k in range(4)]})
        assert refused.status_code == 413, refused.text
        error = refused.json()["error"]
        assert error["code"] == "input_too_large" and "DDPM_MAX_INPUT_BYTES" in error["message"]
        latents = base64.b64encode(npy_bytes(np.zeros((4, 1, 8, 8), np.float32))).decode()
        refused = client.post("/sample", json={"n": 4, "steps": 1, "latents": latents})
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "input_too_large"
        accepted = client.post("/likelihood", json={"images": [png_b64(k) for k in range(3)]})
        assert accepted.status_code == 202, accepted.text
        wait_done(client, accepted.json()["id"])


def test_one_api_key_cannot_fill_the_queue_for_everyone(model_dirs):
    settings = server_settings(
        model_dirs[:1], max_batch=1, max_queued_jobs=8, max_queued_jobs_per_key=1, api_keys=[KEY_A, KEY_B]
    )
    with (
        live_server(settings) as live,
        live.client(Authorization=f"Bearer {KEY_A}") as alice,
        live.client(Authorization=f"Bearer {KEY_B}") as bob,
    ):
        running = alice.post("/sample", json=LONG).json()
        wait_for(alice, running["id"], lambda job: job["status"] == "running")
        queued = alice.post("/sample", json=LONG)
        assert queued.status_code == 202
        refused = alice.post("/sample", json=LONG)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["code"] == "key_queue_full" and "DDPM_MAX_QUEUED_JOBS_PER_KEY" in error["message"]
        assert alice.post("/likelihood", json={"images": [png_b64(1)]}).status_code == 429
        theirs = bob.post("/sample", json=LONG)  # another key still gets in
        assert theirs.status_code == 202
        alice.delete(f"/jobs/{queued.json()['id']}")  # cancelled: no longer waiting
        again = alice.post("/sample", json=LONG)
        assert again.status_code == 202
        for client, job in ((alice, again.json()), (bob, theirs.json()), (alice, running)):
            client.delete(f"/jobs/{job['id']}")


def test_the_python_client_reads_progress_past_the_budget(budgeted):
    from app.client import Client, Job, Progress

    with Client(budgeted.url) as ddpm:
        events = list(ddpm.stream(ddpm.sample(8, steps=40, seed=3, stream_every=1)))
    progress = [e for e in events if isinstance(e, Progress)]
    assert isinstance(events[-1], Job) and [p.step for p in progress] == list(range(1, 41))
    first, last = progress[0], progress[-1]
    assert not first.budget_exhausted and first.x0_array().shape == (8, 1, 8, 8)
    assert last.budget_exhausted and last.x0 == [] and last.x0_array() is None  # was a ValueError
