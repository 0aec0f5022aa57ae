"""/readyz of an API replica in distributed mode, against a real redis-server: the service's readiness
(Redis answers and a worker has a live heartbeat) and the replica's own (`?workers=false`: Redis answers),
which the Kubernetes readiness probe uses so that workers all down do not empty the load balancer."""

from __future__ import annotations

from app.jobs.redis_keys import Keys
from app.settings import Settings
from tests.api.conftest import live_server
from tests.redis_server import free_port

KEYS = Keys()


def test_without_workers_the_service_is_not_ready_but_the_replica_is_and_still_queues(redis_server):
    with live_server(Settings(redis_url=redis_server.url, device="cpu")) as live, live.client() as client:
        service = client.get("/readyz")
        assert service.status_code == 503, service.text
        assert "no worker has a live heartbeat" in service.json()["error"]["message"]
        replica = client.get("/readyz", params={"workers": "false"})
        assert replica.status_code == 200 and replica.json()["models"] == ["tiny"], replica.text
        # What such a replica is kept in its load balancer for: new jobs wait in the queue for a worker.
        queued = client.post("/sample", json={"steps": 5})
        assert queued.status_code == 202 and queued.json()["status"] == "queued", queued.text
        assert client.get(f"/jobs/{queued.json()['id']}").json()["queue_position"] == 1


def test_a_replica_without_redis_is_not_ready_either_way():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with live_server(Settings(redis_url=url, device="cpu")) as live, live.client() as client:
        for params in ({}, {"workers": "false"}):
            answer = client.get("/readyz", params=params)
            assert answer.status_code == 503 and "Redis is unreachable" in answer.json()["error"]["message"]


def test_an_embedded_server_answers_both_alike(tmp_path):
    from tests.api.conftest import save_tiny, server_settings

    model = str(save_tiny(tmp_path / "tiny", timesteps=10, variance_type="fixed_large"))
    with live_server(server_settings([model])) as live, live.client() as client:
        ready = {"status": "ready", "models": ["tiny"]}
        assert client.get("/readyz").json() == client.get("/readyz?workers=false").json() == ready
