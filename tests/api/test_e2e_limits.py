"""Limits and access over real HTTP: a full queue, API keys, expiry, and readiness when an engine stops."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.api.conftest import live_server, png_b64, server_settings, wait_done, wait_for

pytestmark = pytest.mark.service

KEY_A, KEY_B = "a" * 8 + "-key-for-alice", "b" * 8 + "-key-for-bobby"
LONG = {"n": 1, "steps": 1000, "stream_every": 0}


def test_a_full_queue_answers_429_with_retry_after(model_dirs):
    settings = server_settings(model_dirs[:1], max_batch=1, max_queued_jobs=1)
    with live_server(settings) as live, live.client() as client:
        running = client.post("/sample", json=LONG).json()
        wait_for(client, running["id"], lambda job: job["status"] == "running")
        queued = client.post("/sample", json=LONG)
        assert queued.status_code == 202
        refused = client.post("/sample", json=LONG)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        for route, body in (
            ("/interpolate", {"a": {"image": png_b64(1)}, "b": {"image": png_b64(2)}, "num": 2, "t": 3}),
            ("/reconstruct", {"image": png_b64(1), "t": 3, "n": 1}),
            ("/likelihood", {"images": [png_b64(1)]}),
        ):
            assert client.post(route, json=body).status_code == 429, route
        client.delete(f"/jobs/{queued.json()['id']}")
        assert client.post("/sample", json={"n": 1, "steps": 1}).status_code == 202  # room again
        client.delete(f"/jobs/{running['id']}")


@pytest.fixture(scope="module")
def secured(model_dirs):
    with live_server(server_settings(model_dirs[:1], api_keys=[KEY_A, KEY_B])) as live:
        yield live


def test_without_a_key_or_with_a_wrong_one_job_routes_are_401(secured):
    with secured.client() as anonymous:
        for response in (
            anonymous.post("/sample", json={"steps": 1}),
            anonymous.post("/interpolate", json={"a": {"seed": 1}, "b": {"seed": 2}, "num": 2}),
            anonymous.post("/reconstruct", json={"image": png_b64(1)}),
            anonymous.post("/likelihood", json={"images": [png_b64(1)]}),
            anonymous.get("/models"),
            anonymous.get("/jobs/anything"),
            anonymous.get("/stream/anything"),
        ):
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
    with secured.client(Authorization="Bearer " + "x" * 20) as wrong:
        assert wrong.get("/models").json()["error"]["message"] == "wrong API key"


@pytest.mark.parametrize("body", [b"{bad", b'{"n": "\xff"}'])  # a syntax error; bytes that are not UTF-8
def test_a_body_that_cannot_be_parsed_is_401_before_422_without_a_key(secured, body):
    """FastAPI parses a body before the route's dependencies check the key: the key still comes first."""
    json_headers = {"content-type": "application/json"}
    for headers, status in (
        (json_headers, 401),
        ({**json_headers, "X-API-Key": "x" * 20}, 401),
        ({**json_headers, "X-API-Key": KEY_A}, 422),
        ({**json_headers, "Authorization": f"bearer {KEY_B}"}, 422),
    ):
        with secured.client() as client:
            response = client.post("/sample", content=body, headers=headers)
        assert response.status_code == status, (headers, response.text)
        code = response.json()["error"]["code"]
        assert code == ("unauthorized" if status == 401 else "validation_error")
    with secured.client() as probe:  # probes and scrapers need no key
        assert probe.get("/healthz").status_code == 200 and probe.get("/readyz").status_code == 200
        assert probe.get("/metrics").status_code == 200


def test_a_job_is_visible_only_to_the_key_that_made_it(secured):
    with (
        secured.client(Authorization=f"Bearer {KEY_A}") as alice,
        secured.client(**{"X-API-Key": KEY_B}) as bob,
    ):
        job = alice.post("/sample", params={"wait": "true"}, json={"steps": 2}).json()
        assert job["status"] == "succeeded"
        assert alice.get(f"/jobs/{job['id']}/images/0.png").status_code == 200
        for path in ("", "/images/0.png", "/grid.png"):
            assert bob.get(f"/jobs/{job['id']}{path}").status_code == 404
        assert bob.get(f"/stream/{job['id']}").status_code == 404
        assert bob.delete(f"/jobs/{job['id']}").status_code == 404
        assert bob.get("/models").status_code == 200
        # Nor can another key use its images as a source.
        assert bob.post("/reconstruct", json={"job": job["id"], "t": 3, "n": 1}).status_code == 404
        ends = {"a": {"job": job["id"]}, "b": {"seed": 1}, "num": 2, "t": 3}
        assert bob.post("/interpolate", json=ends).status_code == 404
        assert alice.post("/reconstruct", json={"job": job["id"], "t": 3, "n": 1}).status_code == 202


def test_an_engine_hung_in_a_step_makes_readyz_503(model_dirs, monkeypatch):
    with (
        live_server(server_settings(model_dirs[:1], engine_stall_seconds=0.5)) as live,
        live.client() as client,
    ):
        engine = live.app.state.service.dispatcher.pool.engines["tiny"]
        assert client.get("/readyz").status_code == 200
        monkeypatch.setattr(engine, "stalled_for", lambda: 0.6)  # as if one step had lasted that long
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["error"]["message"] == (
            "engine of tiny in one step for over 0.5 s (DDPM_ENGINE_STALL_SECONDS): hung?"
        )
        monkeypatch.setattr(engine, "stalled_for", lambda: 0.4)
        assert client.get("/readyz").status_code == 200


def test_jobs_expire_and_an_engine_that_stopped_makes_readyz_503(model_dirs):
    with live_server(server_settings(model_dirs[:1], job_ttl_seconds=1)) as live, live.client() as client:
        job = client.post("/sample", params={"wait": "true"}, json={"steps": 2}).json()
        assert wait_done(client, job["id"])["status"] == "succeeded"
        time.sleep(1.3)
        for path in (f"/jobs/{job['id']}", f"/jobs/{job['id']}/images/0.png", f"/stream/{job['id']}"):
            assert client.get(path).status_code == 404

        queued = client.post("/sample", json={"steps": 1000, "stream_every": 0}).json()
        live.app.state.service.dispatcher.pool.stop(5)  # as if the engine thread had died
        response = client.get("/readyz")
        assert response.status_code == 503 and "tiny" in response.json()["error"]["message"]
        refused = client.post("/sample", json={"steps": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
        start = time.monotonic()
        assert (
            client.delete(f"/jobs/{queued['id']}").json()["status"] == "cancelled"
        )  # ended without the engine
        assert time.monotonic() - start < 2


def test_a_job_the_engine_refuses_fails_and_is_answered_503(model_dirs, monkeypatch):
    """The engine was alive when checked, then its submit raised: the job is failed, not left queued with
    no engine to run it (and no runner watching it)."""
    with live_server(server_settings(model_dirs[:1])) as live, live.client() as client:
        dispatcher = live.app.state.service.dispatcher
        refused: list[str] = []

        def refuse(work) -> None:
            refused.append(work.job_id)
            raise RuntimeError("the engine stopped between the check and the submit")

        monkeypatch.setattr(dispatcher.pool, "submit", refuse)
        response = client.post("/sample", json={"steps": 2})
        assert response.status_code == 503, response.text
        error = {"code": "engine_unavailable", "message": "the tiny engine is not running; see /readyz"}
        assert response.json() == {"error": error}
        [job_id] = refused
        job = client.get(f"/jobs/{job_id}").json()
        assert job["status"] == "failed" and job["error"] == error
        assert dispatcher.runner._lookup(job_id) is None  # forgotten by the runner


def test_a_job_queued_longer_than_the_ttl_is_kept_and_runs(model_dirs):
    """The TTL counts from a job's end: one waiting behind long jobs is still there when its turn comes."""
    settings = server_settings(model_dirs[:1], max_batch=1, job_ttl_seconds=1)
    with live_server(settings) as live, live.client() as client:
        running = client.post("/sample", json=LONG).json()
        wait_for(client, running["id"], lambda job: job["status"] == "running")
        queued = client.post("/sample", json={"n": 1, "steps": 2}).json()
        time.sleep(1.5)
        assert client.get(f"/jobs/{queued['id']}").json()["status"] == "queued"
        client.delete(f"/jobs/{running['id']}")
        assert wait_done(client, queued["id"])["status"] == "succeeded"
        assert client.get(f"/jobs/{queued['id']}/images/0.png").status_code == 200
        time.sleep(1.3)  # then it expires like any other
        assert client.get(f"/jobs/{queued['id']}").status_code == 404


def test_a_server_step_limit_below_the_defaults_lowers_them(model_dirs):
    """T = 100 and DDPM_MAX_STEPS = 10: a request that names no steps (or t) gets the most allowed, not a
    422 about a value it never sent; one that names more is refused."""
    with live_server(server_settings(model_dirs[1:], max_steps=10)) as live, live.client() as client:
        (model,) = client.get("/models").json()
        assert (model["timesteps"], model["max_steps"]) == (100, 10)  # for clients to set their defaults
        sample = client.post("/sample", json={"n": 1})
        assert sample.status_code == 202 and sample.json()["params"]["steps"] == 10
        reconstruct = client.post("/reconstruct", json={"image": png_b64(1), "n": 1})
        assert reconstruct.status_code == 202 and reconstruct.json()["params"]["t"] == 10
        ends = {"a": {"image": png_b64(1)}, "b": {"image": png_b64(2)}, "num": 2}
        interpolate = client.post("/interpolate", json=ends)
        assert interpolate.status_code == 202 and interpolate.json()["params"]["t"] == [10]
        for response in (sample, reconstruct, interpolate):
            assert wait_done(client, response.json()["id"])["status"] == "succeeded"
        refused = client.post("/sample", json={"n": 1, "steps": 11})
        assert refused.status_code == 422 and "must be 1..10" in refused.json()["error"]["message"]


def test_with_api_keys_the_stream_limit_is_per_key_whatever_the_address(model_dirs):
    settings = server_settings(model_dirs[:1], api_keys=[KEY_A, KEY_B], max_streams_per_key=1, max_batch=2)
    with (
        live_server(settings) as live,
        live.client(**{"X-API-Key": KEY_A}) as alice,
        live.client(**{"X-API-Key": KEY_B}) as bob,
        httpx.Client(
            base_url=live.url,
            transport=httpx.HTTPTransport(local_address="127.0.0.2"),
            headers={"X-API-Key": KEY_A},
            timeout=60,
        ) as alice_elsewhere,
    ):
        mine, theirs = alice.post("/sample", json=LONG).json(), bob.post("/sample", json=LONG).json()
        with alice.stream("GET", f"/stream/{mine['id']}") as first:
            assert first.status_code == 200
            refused = alice_elsewhere.get(f"/stream/{mine['id']}")
            assert refused.status_code == 429
            assert refused.json()["error"]["message"] == (
                "this API key has 1 stream open, the most allowed (DDPM_MAX_STREAMS_PER_KEY); close one first"
            )
            with bob.stream("GET", f"/stream/{theirs['id']}") as other_key:
                assert other_key.status_code == 200
        alice.delete(f"/jobs/{mine['id']}")
        bob.delete(f"/jobs/{theirs['id']}")
