"""POST /interpolate and /reconstruct against a real server: sources, grid layout, endpoints, limits."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.api.conftest import fetch_npy, live_server, png_b64, read_sse, server_settings

pytestmark = pytest.mark.service

A, B = png_b64(1), png_b64(2)
PAD = 2  # the grid's border between images


@pytest.fixture(scope="module")
def live(model_dirs):
    # tiny2 (T = 100) is the default; tiny (T = 1000) is there for jobs on another model.
    settings = server_settings(
        [model_dirs[1], model_dirs[0]], max_images=12, max_batch=16, max_preview_events=5
    )
    with live_server(settings) as server:
        yield server


@pytest.fixture
def client(live):
    with live.client() as c:
        yield c


def run(client: httpx.Client, route: str, **body) -> dict:
    """POST with ?wait=true; the succeeded job."""
    response = client.post(route, params={"wait": "true"}, json=body)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded", job
    return job


def grid_size(client: httpx.Client, job: dict) -> tuple[int, int]:
    return Image.open(io.BytesIO(client.get(job["result"]["grid_url"]).content)).size


def cell(count: int) -> int:
    return count * (8 + PAD) + PAD


def pixels(b64: str) -> np.ndarray:
    """An uploaded PNG in model space, (1, 8, 8) in [-1, 1]."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.float32)[None] / 127.5 - 1


# Interpolation


def test_lambda_0_and_1_decode_exactly_like_the_reconstructions_of_a_and_b(client):
    job = run(client, "/interpolate", a={"image": A}, b={"image": B}, t=10, lambdas=[0, 0.5, 1], seed=5)
    assert job["kind"] == "interpolate" and job["params"]["lambdas"] == [0, 0.5, 1]
    assert job["params"]["a"] == {"image": True}  # the job records the source, not the upload
    images = fetch_npy(client, job)
    assert images.shape == (3, 1, 8, 8) and np.isfinite(images).all()
    # Same seed and t: the same encoding noise, and every λ decodes with reconstruction 0's noise.
    rec_a = fetch_npy(client, run(client, "/reconstruct", image=A, t=10, n=1, seed=5))
    rec_b = fetch_npy(client, run(client, "/reconstruct", image=B, t=10, n=1, seed=5))
    np.testing.assert_allclose(images[0], rec_a[0], atol=1e-4)
    np.testing.assert_allclose(images[2], rec_b[0], atol=1e-4)
    assert np.abs(images[0] - images[2]).max() > 0.1  # a and b decode differently: the check has teeth


def test_num_spreads_lambdas_evenly_into_one_grid_row(client):
    job = run(client, "/interpolate", a={"image": A}, b={"image": B}, t=4, num=4, seed=1)
    assert job["params"]["lambdas"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert (job["result"]["rows"], job["result"]["columns"]) == (1, 4)
    assert len(job["result"]["images"]) == 4
    assert grid_size(client, job) == (cell(4), cell(1))  # (width, height)


def test_seed_sources_are_the_samples_of_that_seed(client):
    job = run(client, "/interpolate", a={"seed": 7}, b={"seed": 8}, t=5, num=2, seed=1)
    assert job["progress"] == {"step": 105, "steps": 105}  # T = 100 sampling steps, then 5 decoding
    assert (job["params"]["a"], job["params"]["b"]) == ({"seed": 7}, {"seed": 8})
    images = fetch_npy(client, job)
    # The seed-7 source is what /sample draws with seed 7; λ = 0 reconstructs it.
    sample = run(client, "/sample", n=1, seed=7)
    rec = fetch_npy(client, run(client, "/reconstruct", job=sample["id"], index=0, t=5, n=1, seed=1))
    np.testing.assert_allclose(images[0], rec[0], atol=1e-3)
    assert np.abs(images[0] - images[1]).max() > 0.1


def test_several_t_make_one_row_each_from_a_previous_jobs_exact_floats(client):
    source = run(client, "/sample", n=2, steps=3, seed=3)
    ends = {"a": {"job": source["id"], "index": 0}, "b": {"job": source["id"], "index": 1}}
    job = run(client, "/interpolate", **ends, t=[3, 6], num=3, seed=2)
    assert (job["result"]["rows"], job["result"]["columns"]) == (2, 3)
    assert grid_size(client, job) == (cell(3), cell(2))
    images = fetch_npy(client, job)
    assert images.shape == (6, 1, 8, 8)
    for row, t in enumerate((3, 6)):  # ordered by t, then λ
        for column, index in ((0, 0), (2, 1)):
            rec = run(client, "/reconstruct", job=source["id"], index=index, t=t, n=1, seed=2)
            np.testing.assert_allclose(images[3 * row + column], fetch_npy(client, rec)[0], atol=1e-4)
    # The source is the job's float image, not its 8-bit PNG: going through the PNG gives another result.
    png = base64.b64encode(client.get(f"/jobs/{source['id']}/images/0.png").content).decode()
    via_png = run(client, "/reconstruct", image=png, t=3, n=1, seed=2)
    assert not np.array_equal(fetch_npy(client, via_png)[0], images[0])


@pytest.mark.parametrize(
    ("change", "status", "fragment"),
    [
        ({"lambdas": [0, 1], "num": 2}, 422, "exactly one of lambdas or num"),
        ({}, 422, "exactly one of lambdas or num"),
        ({"num": 1}, 422, "num"),
        ({"lambdas": [0, 1.5]}, 422, "lambdas.1"),
        ({"num": 2, "t": 101}, 422, "t: every t must be 1..100"),
        ({"num": 2, "t": [5, 0]}, 422, "t: every t must be 1..100"),
        ({"num": 2, "t": [8, 5], "steps": 6}, 422, "steps: must be 1..5"),
        ({"num": 4, "t": [1, 2, 3, 4]}, 422, "16 images, more than the 12"),
        ({"num": 2, "a": {"image": "not base64!"}}, 400, "a.image: not valid base64"),
        ({"num": 2, "a": {"image": base64.b64encode(b"hello").decode()}}, 400, "a.image: not an image"),
        ({"num": 2, "b": {"image": png_b64(3, size=16)}}, 422, "b.image: expected a 8×8 image, got 16×16"),
        ({"num": 2, "b": {"image": png_b64(3, mode="RGB")}}, 422, "expected a grayscale (1 channel) image"),
        ({"num": 2, "a": {}}, 422, "a: expected"),
        ({"num": 2, "a": {"job": "f" * 32}}, 404, "job ffff"),
        ({"num": 2, "model": "nope"}, 404, "no model 'nope'"),
        ({"num": 2, "a": {"image": A, "index": 1}}, 422, "a.index: is only meaningful with job"),
        ({"num": 2, "b": {"seed": 3, "index": 0}}, 422, "b.index: is only meaningful with job"),
        ({"num": 2, "a": {"image": A, "index": "x"}}, 422, "a.index: is only meaningful with job"),
    ],
)
def test_bad_interpolations_are_refused_with_the_reason(client, change, status, fragment):
    body = {"a": {"image": A}, "b": {"image": B}, "t": 5, **change}
    response = client.post("/interpolate", json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def test_a_job_source_must_have_succeeded_on_the_same_model_and_have_that_image(client):
    running = client.post("/sample", json={"model": "tiny", "n": 1, "steps": 1000, "stream_every": 0}).json()
    for route, body in (
        ("/interpolate", {"a": {"job": running["id"]}, "b": {"image": A}, "num": 2}),
        ("/reconstruct", {"job": running["id"]}),
    ):
        response = client.post(route, json={"model": "tiny", "t": 3, **body})
        assert response.status_code == 409 and response.json()["error"]["code"] == "not_finished"
    assert client.delete(f"/jobs/{running['id']}").json()["status"] == "cancelled"
    response = client.post("/reconstruct", json={"model": "tiny", "job": running["id"], "t": 3})
    assert response.status_code == 409 and "ended as cancelled" in response.json()["error"]["message"]

    other_model = run(client, "/sample", model="tiny", n=1, steps=1)
    response = client.post(
        "/interpolate", json={"a": {"job": other_model["id"]}, "b": {"image": A}, "num": 2}
    )
    assert response.status_code == 422
    assert (
        response.json()["error"]["message"] == f"a.job: job {other_model['id']} ran on model tiny, not tiny2"
    )

    two = run(client, "/sample", n=2, steps=1)
    response = client.post("/reconstruct", json={"job": two["id"], "index": 2, "t": 3})
    assert response.status_code == 422
    assert response.json()["error"]["message"] == f"index: job {two['id']} has images 0..1, not image 2"


# Reconstruction


def test_reconstructions_share_one_x_t(client):
    varied = fetch_npy(client, run(client, "/reconstruct", image=A, t=10, n=3, seed=4))
    assert varied.shape == (3, 1, 8, 8) and np.isfinite(varied).all()
    assert min(np.abs(varied[i] - varied[j]).max() for i, j in ((0, 1), (0, 2), (1, 2))) > 1e-3
    # From x_1 the reverse step adds no noise (Algorithm 2: z = 0 at t = 1), so runs that share x_1
    # end identical, and near the image itself.
    job = run(client, "/reconstruct", image=A, t=1, n=3, seed=4)
    assert job["progress"]["steps"] == 1 and job["params"]["image"] is True
    same = fetch_npy(client, job)
    np.testing.assert_allclose(same[1:], same[:1].repeat(2, axis=0), atol=1e-6)
    assert np.abs(same[0] - pixels(A)).max() < 0.1


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"image": A, "job": "f" * 32}, 422, "exactly one of image or job"),
        ({}, 422, "exactly one of image or job"),
        ({"image": A, "t": 101}, 422, "t: must be 1..100 for model tiny2"),
        ({"image": A, "t": 0}, 422, "t: "),
        ({"image": A, "n": 13}, 422, "n: at most 12 images"),
        ({"image": "%%%"}, 400, "image: not valid base64"),
        ({"image": png_b64(3, size=4)}, 422, "image: expected a 8×8 image, got 4×4"),
        ({"job": "f" * 32}, 404, "job ffff"),
        ({"image": A, "index": 0}, 422, "index: is only meaningful with job"),
        ({"image": A, "index": 2}, 422, "index: is only meaningful with job"),
    ],
)
def test_bad_reconstructions_are_refused_with_the_reason(client, body, status, fragment):
    response = client.post("/reconstruct", json={"t": 3, **body})
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def test_previews_are_coarsened_to_the_per_job_cap(client):
    job = client.post("/reconstruct", json={"image": A, "t": 20, "n": 1, "stream_every": 1}).json()
    assert job["params"]["stream_every"] == 4  # 20 steps, at most 5 previews (max_preview_events)
    with client.stream("GET", f"/stream/{job['id']}") as response:
        events = list(read_sse(response))
    assert [e.data["step"] for e in events if e.event == "progress"] == [4, 8, 12, 16, 20]
    assert events[-1].event == "done"
    kept = client.post("/reconstruct", json={"image": A, "t": 20, "n": 1, "stream_every": 10}).json()
    assert kept["params"]["stream_every"] == 10


def test_an_index_sent_without_a_job_is_refused_naming_that_field(client):
    # `index` picks an image of a job: with an uploaded image or a seed it would be silently ignored.
    cases = [
        ("/reconstruct", {"image": A, "index": 1, "t": 3}, "index"),
        ("/interpolate", {"a": {"image": A, "index": 0}, "b": {"image": B}, "num": 2}, "a.index"),
        ("/interpolate", {"a": {"image": A}, "b": {"seed": 1, "index": 0}, "num": 2}, "b.index"),
    ]
    for route, body, field in cases:
        response = client.post(route, json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "validation_error" and error["details"] == [
            {"field": field, "message": error["message"].removeprefix(f"{field}: ")}
        ]
        assert '{"job": id, "index": k}' in error["message"]
    # The published schema says so too, and keeps index out of the image and seed sources.
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["ReconstructRequest"]["oneOf"][0]["not"] == {"required": ["index"]}
    assert "index" not in schemas["ImageSource"]["properties"]
    assert "index" not in schemas["SeedSource"]["properties"]
