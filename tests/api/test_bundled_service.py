"""The default service (no --model: the bundled MNIST model) end to end over HTTP, as the README runs it."""

import base64

import numpy as np
import pytest

from app.images import png_bytes, to_uint8
from app.settings import Settings
from app.training.data import SHARED_MNIST, load_images
from tests.api.conftest import live_server, read_sse


@pytest.fixture(scope="module")
def live():
    with live_server(Settings(device="cpu")) as server:
        yield server


def test_models_lists_the_bundled_model_as_default(live):
    with live.client() as c:
        (model,) = c.get("/models").json()
    assert model["name"] == "mnist" and model["default"] is True
    assert (model["resolution"], model["channels"], model["timesteps"]) == (28, 1, 1000)


def test_sample_stream_and_interpolate(live):
    with live.client() as c:
        job = c.post("/sample", json={"n": 4, "steps": 20, "sampler": "ddim", "seed": 0, "stream_every": 5})
        assert job.status_code == 202
        with c.stream("GET", f"/stream/{job.json()['id']}") as r:
            events = list(read_sse(r))
        assert [e.event for e in events].count("progress") == 4 and events[-1].event == "done"
        done = events[-1].data
        assert done["status"] == "succeeded"
        row = c.post(
            "/interpolate?wait=true",
            json={
                "a": {"job": done["id"], "index": 0},
                "b": {"job": done["id"], "index": 1},
                "t": 300,
                "num": 5,
                "steps": 20,
            },
        )
        assert row.status_code == 200 and row.json()["status"] == "succeeded"
        assert len(row.json()["result"]["images"]) == 5


def test_likelihood_of_real_digits_is_better_than_uniform(live):
    """8 bits/dim is a uniform distribution over the 256 pixel values; a trained model does far better."""
    digits = load_images(SHARED_MNIST)[-2:]
    images = [base64.b64encode(png_bytes(a)).decode() for a in to_uint8(digits)]
    with live.client() as c:
        r = c.post("/likelihood?wait=true", json={"images": images, "seed": 0}, timeout=600)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    bpd = np.array(result["bits_per_dim"])
    terms = result["terms"]
    assert np.isfinite(bpd).all() and (bpd > 0).all() and (bpd < 8).all(), bpd
    total = np.array(terms["prior"]) + np.array(terms["diffusion"]) + np.array(terms["decoder"])
    np.testing.assert_allclose(total, bpd, rtol=1e-4)
