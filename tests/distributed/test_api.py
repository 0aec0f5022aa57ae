"""The API of distributed mode in-process (uvicorn in a thread) against a real redis-server, with no worker:
a "busy worker" is a consumer that claimed an entry and never ends it, so nothing moves unless a test
moves it. Queue positions after cancellations, and the answers while Redis is unreachable.
"""

from __future__ import annotations

import httpx

from app.api import redis_dispatch
from app.jobs.redis_keys import GROUP, Keys
from app.settings import Settings
from tests.api.conftest import live_server
from tests.redis_server import free_port

KEYS = Keys()


def settings(url: str) -> Settings:
    return Settings(redis_url=url, device="cpu")


def queue(client: httpx.Client, count: int, **body) -> list[str]:
    ids = []
    for _ in range(count):
        response = client.post("/sample", json={"steps": 50, **body})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def positions(client: httpx.Client, ids: list[str]) -> list[int | None]:
    return [client.get(f"/jobs/{job_id}").json()["queue_position"] for job_id in ids]


def test_cancelled_and_expired_jobs_stop_counting_in_queue_positions(redis_server, monkeypatch):
    # No background refresh: what a request sees right after a DELETE is what that DELETE left.
    monkeypatch.setattr(redis_dispatch, "REFRESH_SECONDS", 3600.0)
    r = redis_server.client()
    with (
        live_server(settings(redis_server.url)) as one,
        live_server(settings(redis_server.url)) as two,
        one.client() as client,
        two.client() as other,
    ):
        [busy] = queue(client, 1, n=64)
        r.xreadgroup(GROUP, "busy-worker", {KEYS.queue("tiny"): ">"}, count=1)  # it runs "forever"
        client.get("/readyz")  # a refresh (503: no worker heartbeat) sees it claimed
        first, second, third = queue(client, 3)
        assert positions(client, [busy, first, second, third]) == [None, 1, 2, 3]

        for job_id in (first, second):
            assert client.delete(f"/jobs/{job_id}").json()["status"] == "cancelled"
        assert positions(client, [first, second, third]) == [None, None, 1]  # at once, on this replica

        fourth, fifth = queue(client, 2)
        assert positions(client, [third, fourth, fifth]) == [1, 2, 3]
        r.delete(*KEYS.job_keys(fourth))  # expired: its entry stays in the queue until a worker reads it
        assert other.get("/readyz").status_code == 503  # no worker; it refreshed all the same
        assert positions(other, [third, fifth]) == [1, 2]

        assert other.delete(f"/jobs/{third}").json()["status"] == "cancelled"  # on the other replica
        assert positions(other, [fifth]) == [1]
        client.get("/readyz")  # this replica sees it at its next refresh
        assert positions(client, [third, fifth]) == [None, 1]


def test_while_redis_is_unreachable_models_and_new_jobs_get_503s_naming_it():
    port = free_port()  # nothing listens there
    shown = f"Redis is unreachable at redis://***@127.0.0.1:{port}/0 ("  # the URL, not its password
    with (
        live_server(settings(f"redis://:s3cret@127.0.0.1:{port}/0?password=s3cret")) as live,
        live.client() as client,
    ):
        for response in (client.get("/models"), client.post("/sample", json={"steps": 2})):
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error["code"] == "redis_unavailable" and shown in error["message"], error
            assert "s3cret" not in response.text and response.headers["Retry-After"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and shown in ready.json()["error"]["message"]
        assert "s3cret" not in ready.text


def test_before_any_worker_started_new_jobs_are_503_not_ready_and_readyz_says_why(redis_server):
    redis_server.client().delete(KEYS.models)  # no worker has ever published a model
    with live_server(settings(redis_server.url)) as live, live.client() as client:
        refused = client.post("/sample", json={"steps": 2})
        assert refused.status_code == 503, refused.text
        message = "no model is available yet: no worker has started"
        assert refused.json() == {"error": {"code": "not_ready", "message": message}}
        assert refused.headers["Retry-After"] == "5"
        ready = client.get("/readyz")
        assert ready.status_code == 503
        message = "no worker has a live heartbeat: start ddpm-worker (see docs/distributed.md)"
        assert ready.json() == {"error": {"code": "not_ready", "message": message}}
        assert redis_server.client().keys("ddpm:job:*") == []  # nothing was queued
