"""POST /likelihood against a real server: the bound in bits/dim, its terms and curve, and its limits."""

from __future__ import annotations

import numpy as np
import pytest

from tests.api.conftest import live_server, png_b64, server_settings, wait_done

pytestmark = pytest.mark.service

A, B = png_b64(1), png_b64(2)
T = 100  # tiny2


@pytest.fixture(scope="module")
def live(model_dirs):
    with live_server(server_settings(model_dirs[1:], max_images=3)) as server:
        yield server


@pytest.fixture
def client(live):
    with live.client() as c:
        yield c


def test_bits_per_dim_is_the_sum_of_its_terms_with_a_curve_over_every_t(client):
    # Two jobs side by side: image k's bound depends only on (seed, k), not on what else runs.
    alone = client.post("/likelihood", json={"images": [A], "seed": 3}).json()
    response = client.post(
        "/likelihood", params={"wait": "true"}, json={"images": [A, B], "seed": 3, "curve": True}
    )
    assert response.status_code == 200
    job = response.json()
    assert job["status"] == "succeeded" and job["kind"] == "likelihood"
    assert job["progress"] == {"step": T, "steps": T} and job["params"]["images"] == 2
    result = job["result"]
    bpd = np.array(result["bits_per_dim"])
    terms = {name: np.array(values) for name, values in result["terms"].items()}
    assert bpd.shape == (2,) and np.isfinite(bpd).all()
    # Random weights: a poor model, but a bound of a few bits to a few tens of bits per dimension.
    assert (bpd > 0.5).all() and (bpd < 100).all()
    np.testing.assert_allclose(bpd, terms["prior"] + terms["diffusion"] + terms["decoder"], atol=1e-4)
    assert (terms["prior"] >= 0).all() and (terms["diffusion"] >= 0).all() and (terms["decoder"] > 0).all()

    curve = result["curve"]
    assert curve["t"] == list(range(1, T + 1))
    rate, distortion = np.array(curve["rate"]), np.array(curve["distortion"])
    assert rate.shape == distortion.shape == (2, T)
    np.testing.assert_allclose(rate[:, 0], bpd, atol=1e-4)  # from x_T all the way down to x_0: L
    assert (np.diff(rate, axis=1) <= 1e-5).all()  # fewer bits spent the less far down one goes
    assert np.isfinite(distortion).all() and (distortion >= 0).all()

    first = wait_done(client, alone["id"])["result"]
    assert first["curve"] is None
    assert first["bits_per_dim"][0] == pytest.approx(bpd[0], abs=1e-4)


def test_a_likelihood_job_has_no_images(client):
    job = client.post("/likelihood", params={"wait": "true"}, json={"images": [B], "seed": 1}).json()
    assert job["status"] == "succeeded" and "images" not in job["result"]
    for path in ("images/0.png", "images/0.npy", "images.npy", "grid.png"):
        assert client.get(f"/jobs/{job['id']}/{path}").status_code == 404, path
    response = client.post("/reconstruct", json={"job": job["id"], "t": 3, "n": 1})
    assert response.status_code == 422 and "has no images" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("images", "status", "fragment"),
    [
        ([], 422, "images: List should have at least 1 item"),
        ([A] * 4, 422, "images: at most 3 images per request"),
        ([A, "bad!"], 400, "images.1: not valid base64"),
        ([png_b64(4, size=16)], 422, "images.0: expected a 8×8 image, got 16×16"),
        ([png_b64(4, mode="RGBA")], 422, "images.0: expected a grayscale (1 channel) image, got mode RGBA"),
        ("not a list", 422, "images: Input should be a valid list"),
    ],
)
def test_bad_likelihood_requests_are_refused_with_the_reason(client, images, status, fragment):
    response = client.post("/likelihood", json={"images": images})
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def test_a_server_step_limit_below_t_refuses_the_bound(model_dirs):
    with live_server(server_settings(model_dirs[1:], max_steps=50)) as live, live.client() as client:
        response = client.post("/likelihood", json={"images": [A]})
        assert response.status_code == 422
        assert "takes all T = 100 steps, more than the 50" in response.json()["error"]["message"]
