"""POST /likelihood against a real server: the bound in bits/dim, its terms and curve, and its limits."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

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
    # Having x_1: L_T + … + L_1, the bound without the decoder's L_0 (Table 2's rate); having x_T: L_T.
    np.testing.assert_allclose(rate[:, 0], terms["prior"] + terms["diffusion"], atol=1e-4)
    np.testing.assert_allclose(rate[:, -1], terms["prior"], atol=1e-4)
    assert (np.diff(rate, axis=1) <= 1e-5).all()  # fewer bits spent the less far down one goes
    assert np.isfinite(distortion).all() and (distortion >= 0).all()

    first = wait_done(client, alone["id"])["result"]
    assert first["curve"] is None
    assert first["bits_per_dim"][0] == pytest.approx(bpd[0], abs=1e-4)


def test_a_likelihood_job_has_no_images(client):
    job = client.post("/likelihood", params={"wait": "true"}, json={"images": [B], "seed": 1}).json()
    assert job["status"] == "succeeded" and "images" not in job["result"]
    # The job exists: its downloads say what it is and where its result is, not "unknown or expired".
    for path in ("images/0.png", "images/0.npy", "images.npy", "grid.png"):
        response = client.get(f"/jobs/{job['id']}/{path}")
        assert response.status_code == 404, path
        error = response.json()["error"]
        assert error["code"] == "no_images", path
        assert f"job {job['id']} is a likelihood job" in error["message"]
        assert "result.bits_per_dim" in error["message"] and "not found" not in error["message"]
    unknown = client.get(f"/jobs/{'0' * 32}/grid.png")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    # Nor is it a source of images for another job: the field named is the one the client sent.
    response = client.post("/reconstruct", json={"job": job["id"], "t": 3, "n": 1})
    assert response.status_code == 422
    assert (
        response.json()["error"]["message"]
        == f"job: job {job['id']} is a likelihood job: it makes no images to use"
    )
    response = client.post(
        "/interpolate", json={"a": {"job": job["id"]}, "b": {"image": B}, "t": 3, "num": 2}
    )
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith(f"a.job: job {job['id']} is a likelihood job")


@pytest.mark.parametrize(
    ("images", "status", "fragment"),
    [
        ([], 422, "images: List should have at least 1 item"),
        ([A] * 4, 422, "images: at most 3 images per request"),
        ([A, "bad!"], 400, "images.1: not valid base64"),
        ([png_b64(4, size=16)], 422, "images.0: expected a 8×8 image, got 16×16"),
        ([png_b64(4, mode="RGBA")], 422, "images.0: has transparency"),
        (
            [png_b64(4, mode="RGB")],
            422,
            "images.0: expected a grayscale (1 channel) image, but it has colour",
        ),
        ("not a list", 422, "images: Input should be a valid list"),
    ],
)
def test_bad_likelihood_requests_are_refused_with_the_reason(client, images, status, fragment):
    response = client.post("/likelihood", json={"images": images})
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def encoded(image: Image.Image, fmt: str, **kwargs) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return base64.b64encode(buf.getvalue()).decode()


def test_greyscale_in_webp_rgb_and_16_bit_png_is_the_same_image(client):
    # Pillow decodes every WebP as RGB and a 16-bit PNG as I;16: all are the 8-bit grey image A.
    grey = Image.open(io.BytesIO(base64.b64decode(A)))
    wide = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    uploads = [
        A,
        encoded(grey, "WEBP", lossless=True),
        encoded(grey.convert("RGB"), "PNG"),
        encoded(wide, "PNG"),
    ]
    # Image k's bound depends on (seed, k): one job per upload, each image 0 with the same seed.
    jobs = [client.post("/likelihood", json={"images": [text], "seed": 5}).json() for text in uploads]
    bpd = [wait_done(client, job["id"])["result"]["bits_per_dim"][0] for job in jobs]
    assert bpd == pytest.approx([bpd[0]] * 4, abs=1e-5)


def test_a_server_step_limit_below_t_refuses_the_bound(model_dirs):
    with live_server(server_settings(model_dirs[1:], max_steps=50)) as live, live.client() as client:
        response = client.post("/likelihood", json={"images": [A]})
        assert response.status_code == 422
        assert "takes all T = 100 steps, more than the 50" in response.json()["error"]["message"]
