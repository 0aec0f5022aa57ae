"""`ddpm remote sample|interpolate` against a real server: files written, progress shown, errors clear."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from app.client import Client, DDPMError
from app.nets import load_checkpoint
from app.sampling import generate
from tests.api.canned import canned_server
from tests.api.conftest import live_server, png_b64, server_settings, wait_done

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def live(model_dirs):
    with live_server(server_settings(model_dirs, max_batch=8, max_images=9)) as server:
        yield server


@pytest.fixture(scope="module")
def url(live):
    return live.url


def remote(url: str, command: str, *args: str) -> None:
    """`ddpm remote COMMAND --url URL --model tiny2 ARGS…` in-process."""
    main(["remote", command, "--url", url, "--model", "tiny2", *args])


def test_remote_sample_writes_a_grid_and_floats_with_a_progress_bar(url, tmp_path, capsys):
    out, npy = tmp_path / "grid.png", tmp_path / "x.npy"
    remote(url, "sample", "--n", "4", "--steps", "6", "--seed", "1", "--out", str(out), "--npy", str(npy))
    captured = capsys.readouterr()
    assert Image.open(out).size == (2 * 10 + 2, 2 * 10 + 2)  # 4 images of 8×8 in a 2 × 2 grid
    assert np.load(npy).shape == (4, 1, 8, 8)
    assert f"{out}: 4 images, seed 1, 6 steps" in captured.out
    assert f", floats in {npy}" in captured.out  # both files written are named
    assert "6/6" in captured.err  # the tqdm bar, fed by the stream, reached the end


def test_remote_ddim_forwards_the_sampler_and_seed(url, model_dirs, tmp_path):
    def floats(name: str, sampler: str, seed: str) -> np.ndarray:
        out, npy = tmp_path / f"{name}.png", tmp_path / f"{name}.npy"
        words = ["--n", "2", "--steps", "5", "--sampler", sampler, "--seed", seed, "--out", str(out)]
        remote(url, "sample", *words, "--npy", str(npy))
        return np.load(npy)

    first, again, other = floats("a", "ddim", "9"), floats("b", "ddim", "9"), floats("c", "ddim", "10")
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    # The server ran DDIM: its images are those of the library's DDIM for that seed, not its DDPM ones
    # (which a dropped --sampler, the server's default, would give).
    ckpt = load_checkpoint(model_dirs[1])
    ddim = generate(ckpt, n=2, steps=5, sampler="ddim", seed=9).images.numpy()
    ddpm = generate(ckpt, n=2, steps=5, sampler="ddpm", seed=9).images.numpy()
    assert np.abs(ddim - ddpm).max() > 0.1
    np.testing.assert_allclose(first, ddim, rtol=0, atol=1e-4)


def test_remote_interpolate_from_a_seed_and_a_file_writes_one_row(live, tmp_path, capsys):
    a = tmp_path / "a.png"
    a.write_bytes(base64.b64decode(png_b64(3)))
    out = tmp_path / "row.png"
    words = ["--a", str(a), "--b-seed", "2", "--t", "10", "--num", "5", "--seed", "4", "--out", str(out)]
    remote(live.url, "interpolate", *words)
    assert Image.open(out).size == (5 * 10 + 2, 10 + 2)  # one row (one t) of five λ
    assert "1 × 5 images" in capsys.readouterr().out

    # The file was uploaded and used: the row is the API's own for that image (sent by hand), and
    # not the one for another image (which a seed used in the file's place would not tell apart).
    def api_row(image: str) -> np.ndarray:
        body = {"model": "tiny2", "a": {"image": image}, "b": {"seed": 2}, "t": 10, "num": 5, "seed": 4}
        with live.client() as client:
            response = client.post("/interpolate", params={"wait": "true"}, json=body)
            assert response.status_code == 200, response.text
            job = response.json()
            assert job["status"] == "succeeded", job
            grid = client.get(job["result"]["grid_url"])
        assert grid.status_code == 200, grid.text
        return np.asarray(Image.open(io.BytesIO(grid.content)))

    row, other = np.asarray(Image.open(out)), api_row(png_b64(4))
    assert np.array_equal(row, api_row(png_b64(3)))
    assert not np.array_equal(row, other)


def test_remote_interpolate_with_several_t_writes_one_row_per_t(url, tmp_path):
    out = tmp_path / "rows.png"
    remote(
        url,
        "interpolate",
        "--a-seed",
        "1",
        "--b-seed",
        "2",
        "--t",
        "5,10,20",
        "--num",
        "3",
        "--out",
        str(out),
    )
    assert Image.open(out).size == (3 * 10 + 2, 3 * 10 + 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sample", "--n", "10"], "ddpm remote sample: n: at most 9 images per request"),
        (["sample", "--model", "nope"], "no model 'nope'; loaded: tiny, tiny2 (HTTP 404 unknown_model)"),
        (["interpolate", "--a-seed", "1", "--b-seed", "2", "--t", "5000"], "every t must be 1..1000"),
        (["interpolate", "--a", "missing.png", "--b-seed", "2"], "--a: no such file missing.png"),
    ],
)
def test_remote_errors_exit_with_the_apis_message(url, tmp_path, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["remote", args[0], "--url", url, *args[1:], "--out", str(tmp_path / "x.png")])
    assert message in str(exit_.value.code)
    assert not (tmp_path / "x.png").exists()


def test_an_unreachable_server_exits_with_a_clear_message(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["remote", "sample", "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "x.png")])
    assert "cannot reach http://127.0.0.1:9" in str(exit_.value.code)


def test_a_redirecting_url_exits_saying_where_the_server_is(tmp_path):
    with (
        canned_server(301, headers={"Location": "https://ddpm.example/models"}) as url,
        pytest.raises(SystemExit) as exit_,
    ):
        main(["remote", "sample", "--url", url, "--out", str(tmp_path / "x.png")])
    said = str(exit_.value.code)
    assert said.startswith("ddpm remote sample: the server redirects")
    assert "use https://ddpm.example (HTTP 301 redirect)" in said


def test_a_url_that_is_not_ddpm_serve_exits_with_a_clear_message(tmp_path):
    with (
        canned_server(200, b'{"status": "ok"}', {"Content-Type": "application/json"}) as url,
        pytest.raises(SystemExit) as exit_,
    ):
        main(["remote", "sample", "--url", url, "--out", str(tmp_path / "x.png")])
    said = str(exit_.value.code)
    assert f"is {url} a ddpm-serve server, of a version this client knows? (HTTP 200 bad_response)" in said


def _interrupt_or_fail(monkeypatch, error: BaseException) -> list[str]:
    """Make following a job raise `error` at once; the ids of the jobs it was asked to follow."""
    followed: list[str] = []

    def stream(self, job, **_):
        followed.append(job.id)
        raise error
        yield

    monkeypatch.setattr(Client, "stream", stream)
    return followed


@contextmanager
def _cancelled_after(live, followed: list[str]) -> Iterator[None]:
    """Cancels the job the CLI left running (its cancel failed, or it never asked), for the next test."""
    try:
        yield
    finally:
        with live.client() as http:
            http.delete(f"/jobs/{followed[0]}")
            wait_done(http, followed[0])


def _long_sample(url: str, tmp_path) -> None:
    main(["remote", "sample", "--url", url, "--model", "tiny", "--n", "1", "--out", str(tmp_path / "x.png")])


def test_ctrl_c_cancels_the_job_and_says_so(live, tmp_path, monkeypatch, capsys):
    followed = _interrupt_or_fail(monkeypatch, KeyboardInterrupt())
    with pytest.raises(SystemExit) as exit_:
        _long_sample(live.url, tmp_path)
    assert exit_.value.code == 130
    with live.client() as http:
        assert http.get(f"/jobs/{followed[0]}").json()["status"] == "cancelled"
    assert f"ddpm remote sample: interrupted (job {followed[0]} cancelled)" in capsys.readouterr().err


def test_ctrl_c_exits_130_with_a_warning_when_the_cancel_fails(live, tmp_path, monkeypatch, capsys):
    followed = _interrupt_or_fail(monkeypatch, KeyboardInterrupt())

    def cancel(self, job):
        raise DDPMError(0, "unreachable", f"cannot reach {self.url}: connection refused")

    monkeypatch.setattr(Client, "cancel", cancel)
    with pytest.raises(SystemExit) as exit_, _cancelled_after(live, followed):
        _long_sample(live.url, tmp_path)
    assert exit_.value.code == 130
    said = capsys.readouterr().err
    assert f"interrupted (warning: job {followed[0]} was not cancelled: cannot reach {live.url}" in said
    assert f"it may still be running: see {live.url}/jobs/{followed[0]})" in said


def test_an_error_while_following_names_the_job_and_where_to_see_it(live, tmp_path, monkeypatch):
    lost = DDPMError(0, "unreachable", f"cannot reach {live.url}: connection refused", attempts=6)
    followed = _interrupt_or_fail(monkeypatch, lost)
    with pytest.raises(SystemExit) as exit_, _cancelled_after(live, followed):
        _long_sample(live.url, tmp_path)
    assert str(exit_.value.code) == (
        f"ddpm remote sample: cannot reach {live.url}: connection refused; job {followed[0]} may still "
        f"be running: see {live.url}/jobs/{followed[0]} (unreachable, after 6 attempts)"
    )


def test_previews_follow_the_servers_step_limit(model_dirs, tmp_path, capsys):
    """tiny2 (T = 100) on a server that allows 10 steps: a sample that names no steps runs 10, and the
    progress previews are spaced for 10 steps (every one), not for T (every other, of steps never run)."""
    with live_server(server_settings(model_dirs[1:], max_steps=10)) as live:
        main(["remote", "sample", "--url", live.url, "--n", "1", "--out", str(tmp_path / "g.png")])
        job_id = capsys.readouterr().out.split(", job ")[1].split()[0].rstrip(",")
        with live.client() as client:
            job = client.get(f"/jobs/{job_id}").json()
    assert (job["params"]["steps"], job["params"]["stream_every"]) == (10, 1), job["params"]
