"""Every response carries `X-Content-Type-Options: nosniff`, not only the web page: JSON answers, errors
(the 413 the body limit sends before any route), image downloads, the page and its assets."""

from __future__ import annotations

import pytest

from tests.api.conftest import live_server, server_settings, wait_done

pytestmark = pytest.mark.service


def _nosniff(response) -> bool:
    return response.headers.get_list("x-content-type-options") == ["nosniff"]  # once, not repeated


def test_every_response_has_nosniff(model_dirs):
    settings = server_settings(model_dirs[:1], max_body_bytes=4096)
    with live_server(settings) as live, live.client() as client:
        models = client.get("/models")
        assert models.status_code == 200 and models.headers["content-type"] == "application/json"
        assert _nosniff(models)
        job = client.post("/sample", json={"n": 1, "steps": 2, "seed": 1})
        assert job.status_code == 202 and _nosniff(job)
        assert wait_done(client, job.json()["id"])["status"] == "succeeded"
        png = client.get(f"/jobs/{job.json()['id']}/images/0.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png" and _nosniff(png)
        missing = client.get("/jobs/no-such-job")
        assert missing.status_code == 404 and _nosniff(missing)
        too_large = client.post("/sample", content=b"x" * 5000, headers={"Content-Type": "application/json"})
        assert too_large.status_code == 413 and _nosniff(too_large)
        for path in ("/", "/static/app.js"):  # the page's own routes: still once
            assert _nosniff(client.get(path))
