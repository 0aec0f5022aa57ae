"""Distributed mode under faults, with real processes: nothing accepted is lost, no job ends twice.

One deployment (Redis with AOF, an API, workers `a` and `b`) serves the module; each test leaves it
serving. Reclaim time 2 s, heartbeats every 0.5 s (conftest.py).
"""

from __future__ import annotations

import base64
import io
import signal
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest

from tests.api.conftest import live_server, png_b64, read_sse, server_settings
from tests.distributed.conftest import (
    RECLAIM_SECONDS,
    Cluster,
    final_events,
    metric,
    pending_on,
    wait_all,
)
from tests.tiny import BATCH_ATOL

pytestmark = [pytest.mark.service, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    return make_cluster()


def submit(client: httpx.Client, count: int, **body) -> list[str]:
    ids = []
    for _ in range(count):
        response = client.post("/sample", json=body)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_succeeded_once(cluster: Cluster, client: httpx.Client, jobs: dict[str, dict]) -> None:
    """Every job succeeded, recorded one final event (one `succeeded` transition) and has its result."""
    r = cluster.redis
    for job_id, job in jobs.items():
        assert job["status"] == "succeeded", (job, cluster.logs())
        assert final_events(r, job_id) == ["done"], job_id
        assert client.get(f"/jobs/{job_id}/grid.png").status_code == 200


def job_of_entry(cluster: Cluster, entry_id: str) -> str:
    [(_, fields)] = cluster.redis.xrange("ddpm:queue:tiny", entry_id, entry_id)
    return fields[b"job"].decode()


def worker_metric(cluster: Cluster, worker: str, name: str) -> float:
    return metric(httpx.get(cluster.workers[worker].metrics_url, timeout=5).text, name)


def rss(cluster: Cluster) -> dict[str, int]:
    procs = {"api": cluster.apis[-1], **{n: w for n, w in cluster.workers.items() if w.alive()}}
    return {name: proc.rss_bytes() for name, proc in procs.items()}


@pytest.mark.timeout(150)
def test_a_few_hundred_jobs_from_many_clients_all_succeed_once_in_bounded_memory(cluster):
    def run(count: int, clients: int = 16) -> list[dict]:
        results: list[dict] = []
        lock = threading.Lock()

        def client_loop(share: int) -> None:
            with cluster.client() as client:
                for _ in range(share):
                    body = {"n": 1, "steps": 4, "sampler": "ddim", "stream_every": 2}
                    response = client.post("/sample", params={"wait": "true"}, json=body)
                    assert response.status_code == 200, response.text
                    with lock:
                        results.append(response.json())

        threads = [threading.Thread(target=client_loop, args=(count // clients,)) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert len(results) == count
        return results

    ran_before = sum(worker_metric(cluster, w, "ddpm_jobs_total") for w in ("a", "b"))
    warm = run(48)
    before = rss(cluster)
    jobs = run(208)
    after = rss(cluster)

    everything = {job["id"]: job for job in warm + jobs}
    assert len(everything) == 256  # unique ids
    with cluster.client() as client:
        assert_succeeded_once(cluster, client, everything)
    per_worker = {w: worker_metric(cluster, w, "ddpm_jobs_total") for w in ("a", "b")}
    assert sum(per_worker.values()) - ran_before == 256  # each job finished by exactly one worker
    assert all(count > 0 for count in per_worker.values()), per_worker  # both took a share
    for name, grown in ((n, after[n] - before[n]) for n in before):
        assert grown < 48 * 2**20, (
            f"{name} grew by {grown / 2**20:.0f} MiB over 208 jobs ({before} -> {after})"
        )


@pytest.mark.timeout(120)
def test_every_kind_of_job_gives_through_the_queue_what_it_gives_in_process(cluster):
    """Work crosses Redis intact (params as JSON, uploads and latents as .npy): the same seeds give the
    same numbers as the embedded engines, also for a job that starts from an earlier job's image."""
    latents = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, latents)
    requests = [
        ("/sample", {"n": 2, "steps": 10, "seed": 1, "latents": base64.b64encode(buf.getvalue()).decode()}),
        (
            "/interpolate",
            {"a": {"image": png_b64(1)}, "b": {"image": png_b64(2)}, "t": 10, "num": 3, "seed": 2},
        ),
        ("/reconstruct", {"image": png_b64(3), "t": 10, "n": 2, "seed": 3}),
        ("/likelihood", {"images": [png_b64(4), png_b64(5)], "seed": 4}),
    ]

    def outputs(client: httpx.Client) -> list[np.ndarray]:
        jobs = [client.post(route, params={"wait": "true"}, json=body).json() for route, body in requests]
        from_job = {"a": {"job": jobs[0]["id"], "index": 1}, "b": {"image": png_b64(6)}, "t": 5, "num": 2}
        jobs.append(client.post("/interpolate", params={"wait": "true"}, json={**from_job, "seed": 5}).json())
        assert [job["status"] for job in jobs] == ["succeeded"] * 5, jobs
        return [
            np.array(job["result"]["bits_per_dim"])
            if job["kind"] == "likelihood"
            else np.load(io.BytesIO(client.get(f"/jobs/{job['id']}/images.npy").content))
            for job in jobs
        ]

    with cluster.client() as client:
        distributed = outputs(client)
    with live_server(server_settings([str(cluster.model)])) as live, live.client() as client:
        embedded = outputs(client)
    for d, e in zip(distributed, embedded, strict=True):
        np.testing.assert_allclose(d, e, rtol=1e-5, atol=BATCH_ATOL)


@pytest.mark.timeout(120)
def test_a_new_api_process_serves_the_jobs_and_streams_of_one_that_died(cluster):
    with cluster.client() as client:
        ids = submit(client, 4, n=2, steps=50, stream_every=10)
    cluster.apis[-1].signal(signal.SIGKILL)
    cluster.apis[-1].wait(10)

    r = cluster.redis
    status = lambda: [r.hget(f"ddpm:job:{{{i}}}", "status") for i in ids]  # noqa: E731
    wait_until(lambda: all(s == b"succeeded" for s in status()), 60, "the jobs to finish with no API up")

    cluster.start_api()
    cluster.wait_up()
    with cluster.client() as client:
        jobs = {job_id: client.get(f"/jobs/{job_id}").json() for job_id in ids}
        assert_succeeded_once(cluster, client, jobs)
        with client.stream("GET", f"/stream/{ids[0]}") as response:
            lines = [line for line in response.iter_lines() if line.startswith(("id:", "event:"))]
        events = [line.split(": ", 1)[1] for line in lines if line.startswith("event:")]
        assert events == ["progress"] * 5 + ["done"]  # steps 10, 20, …, 50, then the end
        with client.stream("GET", f"/stream/{ids[0]}", headers={"Last-Event-ID": "4"}) as response:
            resumed = [line for line in response.iter_lines() if line.startswith("id:")]
        assert resumed == ["id: 5", "id: 6"]


@pytest.mark.timeout(120)
def test_sigterm_on_an_api_ends_its_streams_and_another_replica_resumes_them_without_a_gap(cluster):
    """The stream ends at once with `shutdown` (no id); Last-Event-ID on another replica gives the rest,
    each event once. The workers' /metrics count the job's queue wait and duration (one each)."""
    old, old_url = cluster.apis[-1], cluster.url
    cluster.start_api()  # a second replica, behind the same (imaginary) load balancer
    cluster.wait_up()
    workers = [w for w in cluster.workers.values() if w.alive()]

    def counted(name: str) -> float:
        return sum(metric(httpx.get(w.metrics_url, timeout=5).text, name) for w in workers)

    names = ("ddpm_queue_wait_seconds_count", "ddpm_job_duration_seconds_count")
    before = {name: counted(name) for name in names}
    with httpx.Client(base_url=old_url, timeout=30) as client:
        [job_id] = submit(client, 1, n=4, steps=50, stream_every=1)
        first: list = []
        with client.stream("GET", f"/stream/{job_id}") as response:
            for message in read_sse(response):
                first.append(message)
                if len(first) == 1:  # the job runs: freeze it (well under the reclaim time), stop the API
                    for worker in workers:
                        worker.signal(signal.SIGSTOP)
                    old.signal(signal.SIGTERM)
                    signalled = time.monotonic()
        ended = time.monotonic()
    for worker in workers:
        worker.signal(signal.SIGCONT)
    assert ended - signalled < 5, ended - signalled
    assert first[-1].event == "shutdown" and first[-1].id is None, first[-3:]
    assert first[-1].data["code"] == "server_shutdown"
    assert old.wait(30) == -signal.SIGTERM, old.tail()

    last_id = first[-2].id
    with cluster.client() as client:
        headers = {"Last-Event-ID": str(last_id)}
        with client.stream("GET", f"/stream/{job_id}", headers=headers) as response:
            rest = list(read_sse(response))
    ids = [m.id for m in first[:-1] + rest]
    assert ids == list(range(1, len(ids) + 1))  # every event once, in order, across the two replicas
    assert rest[-1].event == "done" and rest[-1].data["status"] == "succeeded"
    assert [m.event for m in first[:-1] + rest[:-1]] == ["progress"] * 50

    time.sleep(0.2)
    assert {name: counted(name) - before[name] for name in names} == dict.fromkeys(names, 1.0)
    assert all(
        "# TYPE ddpm_device_memory_bytes gauge" in httpx.get(w.metrics_url, timeout=5).text for w in workers
    )


@pytest.mark.timeout(120)
def test_while_redis_is_unreachable_or_full_requests_get_clear_503s_and_the_service_recovers_by_itself(
    cluster,
):
    cluster.redis_server.stop(signal.SIGKILL)
    with cluster.client(timeout=10) as client:
        started = time.monotonic()
        refused = client.post("/sample", json={"steps": 2})
        assert time.monotonic() - started < 5
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "redis_unavailable" and "Redis" in error["message"]
        assert refused.headers["Retry-After"]
        assert client.get("/jobs/0123456789abcdef").status_code == 503
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "Redis is unreachable" in ready.json()["error"]["message"]
        models = client.get("/models")  # not the models published before: Redis is what is wrong
        assert models.status_code == 503 and models.json()["error"]["code"] == "redis_unavailable"
        assert client.get("/healthz").status_code == 200

        cluster.redis_server.start()
        wait_until(lambda: client.get("/readyz").status_code == 200, 20, "readyz after Redis came back")
        assert [m["name"] for m in client.get("/models").json()] == ["tiny"]
        job = client.post("/sample", params={"wait": "true"}, json={"steps": 5}).json()
        assert job["status"] == "succeeded"

        cluster.redis.config_set("maxmemory", 1)  # full: with noeviction, Redis refuses writes
        full = client.post("/sample", json={"steps": 2})
        assert full.status_code == 503 and full.json()["error"]["code"] == "redis_full", full.text
        cluster.redis.config_set("maxmemory", 0)
        assert (
            client.post("/sample", params={"wait": "true"}, json={"steps": 2}).json()["status"] == "succeeded"
        )
    assert all(p.alive() for p in [cluster.apis[-1], *cluster.workers.values()])  # nothing restarted


@pytest.mark.timeout(150)
def test_restarting_redis_with_jobs_queued_and_running_loses_none(cluster):
    with cluster.client() as client:
        ids = submit(client, 10, n=8, steps=50)  # each fills a worker: 2 run, 8 wait
        wait_until(
            lambda: pending_on(cluster.redis, "a") or pending_on(cluster.redis, "b"), 30, "a job to start"
        )
        cluster.redis_server.restart()  # SIGTERM: Redis writes its AOF out and exits; then it replays it
        jobs = wait_all(client, ids, timeout=120)
        assert_succeeded_once(cluster, client, jobs)
        assert (
            client.post("/sample", params={"wait": "true"}, json={"steps": 3}).json()["status"] == "succeeded"
        )
    assert all(p.alive() for p in [cluster.apis[-1], *cluster.workers.values()])


@pytest.mark.timeout(150)
def test_sigterm_finishes_running_jobs_in_the_grace_period_or_hands_them_back_and_exits_0(cluster):
    patient = cluster.start_worker("patient", worker_grace_seconds=60)
    hasty = cluster.start_worker("hasty", worker_grace_seconds=0)
    cluster.wait_up()
    r = cluster.redis
    with cluster.client() as client:
        ids = submit(client, 6, n=8, steps=50)  # one per worker at a time
        wait_until(lambda: pending_on(r, "patient") and pending_on(r, "hasty"), 60, "both to hold a job")
        patient_job = job_of_entry(cluster, pending_on(r, "patient")[0])
        hasty_job = job_of_entry(cluster, pending_on(r, "hasty")[0])
        wait_until(lambda: client.get(f"/jobs/{hasty_job}").json()["status"] == "running", 30, "it to run")
        stopped_at = datetime.now(UTC)
        patient.signal(signal.SIGTERM)
        hasty.signal(signal.SIGTERM)
        assert hasty.wait(30) == 0, hasty.tail()
        assert patient.wait(60) == 0, patient.tail()
        assert client.get(f"/jobs/{patient_job}").json()["status"] == "succeeded"  # before it exited

        jobs = wait_all(client, ids, timeout=90)
        assert_succeeded_once(cluster, client, jobs)
        restarted = datetime.fromisoformat(jobs[hasty_job]["started_at"].replace("Z", "+00:00"))
        assert restarted > stopped_at  # handed back, then run again from the start by another worker
    assert not pending_on(r, "hasty") and not pending_on(r, "patient")
    del cluster.workers["patient"], cluster.workers["hasty"]


@pytest.mark.timeout(150)
def test_a_stalled_worker_that_wakes_after_a_takeover_does_not_end_the_job_a_second_time(cluster):
    r = cluster.redis
    stalled = cluster.workers["b"]
    with cluster.client() as client:
        ids = submit(client, 4, n=8, steps=50)  # one per worker at a time
        wait_until(lambda: pending_on(r, "b"), 30, "worker b to hold a job")
        entry = pending_on(r, "b")[0]
        job_id = job_of_entry(cluster, entry)
        wait_until(lambda: client.get(f"/jobs/{job_id}").json()["status"] == "running", 30, "it to run")
        stalled.signal(signal.SIGSTOP)  # alive, but silent: no heartbeat, no claim renewal
        try:
            wait_until(lambda: entry in pending_on(r, "a"), 30, "worker a to take the job over")
        finally:
            stalled.signal(signal.SIGCONT)  # b goes on with its copy of the job, or notices and drops it
        jobs = wait_all(client, ids, timeout=90)
        assert_succeeded_once(cluster, client, jobs)
    wait_until(
        lambda: not pending_on(r, "a") and not pending_on(r, "b"), 10, "every entry to be acknowledged"
    )
    assert stalled.alive()


@pytest.mark.timeout(150)
def test_a_killed_worker_s_jobs_succeed_on_the_other_exactly_once_after_the_reclaim_time(cluster):
    r = cluster.redis
    with cluster.client() as client:
        ids = submit(client, 8, n=4, steps=50, stream_every=10)
        wait_until(lambda: pending_on(r, "a"), 30, "worker a to hold a job")
        victims = [job_of_entry(cluster, entry) for entry in pending_on(r, "a")]
        wait_until(lambda: client.get(f"/jobs/{victims[0]}").json()["status"] == "running", 30, "it to run")
        killed_at = datetime.now(UTC)
        cluster.workers["a"].signal(signal.SIGKILL)
        cluster.workers["a"].wait(10)
        jobs = wait_all(client, ids, timeout=90)
        assert_succeeded_once(cluster, client, jobs)
    for victim in victims:
        restarted = datetime.fromisoformat(jobs[victim]["started_at"].replace("Z", "+00:00"))
        # Taken over once idle for the reclaim time, and soon after (b had free rows within a job or two).
        assert timedelta(seconds=RECLAIM_SECONDS * 0.9) <= restarted - killed_at < timedelta(seconds=20)
    assert worker_metric(cluster, "b", "ddpm_worker_reclaims_total") >= len(victims)
    assert worker_metric(cluster, "b", "ddpm_worker_duplicate_ends_total") == 0
    assert not pending_on(r, "a")
