"""A job that fails, seen from outside: GET /jobs, /stream, the downloads and the metrics, over real HTTP.

The model `broken` has NaN output weights, as a diverged training run's checkpoint would: each job on it
runs its steps, then the engine finds its images not finite and fails it (`non_finite`)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from app.cli import main
from app.client import Client, DDPMError, Job, Progress
from tests.api.conftest import Live, live_server, metric, read_sse, server_settings, wait_done

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def live(model_dirs, broken_model_dir) -> Iterator[Live]:
    with live_server(server_settings([model_dirs[1], broken_model_dir])) as server:
        yield server


@pytest.fixture
def client(live) -> Iterator[httpx.Client]:
    with live.client() as client:
        yield client


def failures(client: httpx.Client) -> float:
    return metric(client.get("/metrics").text, "ddpm_jobs_total", kind="sample", outcome="failed")


def test_a_failed_job_says_why_everywhere_and_has_nothing_to_download(client):
    before = failures(client)
    posted = client.post("/sample", json={"model": "broken", "n": 2, "steps": 3, "stream_every": 1})
    assert posted.status_code == 202, posted.text
    job = wait_done(client, posted.json()["id"])
    assert job["status"] == "failed" and job["result"] is None
    assert job["error"]["code"] == "non_finite" and "NaN" in job["error"]["message"]
    assert job["finished_at"] is not None

    with client.stream("GET", f"/stream/{job['id']}") as response:
        events = list(read_sse(response))
    assert [e.event for e in events[:-1]] == ["progress"] * 3
    assert events[-1].event == "error" and events[-1].data["code"] == "non_finite", events[-1]
    assert "done" not in [e.event for e in events]

    for path in ("images/0.png", "images/0.npy", "grid.png", "images.npy"):
        answer = client.get(f"/jobs/{job['id']}/{path}")
        assert answer.status_code == 409, (path, answer.status_code, answer.text)
        assert "failed" in answer.json()["error"]["message"], answer.text
    assert failures(client) == before + 1


def test_a_failed_job_waited_for_is_answered_with_its_failure(client):
    answer = client.post("/sample", params={"wait": "true"}, json={"model": "broken", "n": 1, "steps": 2})
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "failed" and answer.json()["error"]["code"] == "non_finite"
    # The other model on the same engine is not affected.
    fine = client.post("/sample", params={"wait": "true"}, json={"model": "tiny2", "n": 1, "steps": 2})
    assert fine.json()["status"] == "succeeded", fine.text


def test_the_client_and_the_cli_report_a_failed_job(live, tmp_path, capsys):
    with Client(live.url) as ddpm:
        streamed = list(ddpm.stream(ddpm.sample(2, model="broken", steps=3, stream_every=1)))
        final = streamed[-1]
        assert isinstance(final, Job) and final.status == "failed" and final.error["code"] == "non_finite"
        assert [type(event) for event in streamed[:-1]] == [Progress] * 3
        assert ddpm.wait(final.id).status == "failed"
        for download in (ddpm.images, ddpm.grid, ddpm.pil_images):
            with pytest.raises(DDPMError) as caught:
                download(final)
            assert (caught.value.status, caught.value.code) == (409, "not_finished"), download
    out = tmp_path / "grid.png"
    words = ["remote", "sample", "--url", live.url, "--model", "broken", "--n", "1", "--steps", "2"]
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--out", str(out)])
    assert exit_.value.code not in (0, None)
    said = f"{exit_.value.code}\n{capsys.readouterr().err}"
    assert "the model produced NaN or infinite values" in said, said
    assert not out.exists()
