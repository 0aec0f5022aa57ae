"""`eval --real` end to end, and `eval`'s sampling loop with the DDPM stood in for by real digits."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from app.cli import main
from app.evaluation.cli import TABLE_HEADER
from app.images import to_uint8
from app.training.data import SHARED_MNIST, load_images, pad_to

MNIST = str(SHARED_MNIST)
SHIPPED = str(Path(__file__).resolve().parents[2] / "models" / "mnist-classifier")


@pytest.fixture(scope="module")
def digits():
    return load_images(MNIST, with_labels=True)


@pytest.fixture
def small_mnist(tmp_path, digits):
    """The first 2,000 real digits as an .npz: a quick FID reference."""
    path = tmp_path / "digits.npz"
    np.savez(path, images=to_uint8(digits[0][:2000]), labels=digits[1][:2000].numpy())
    return str(path)


def test_eval_real_prints_a_table_row_and_writes_json(tmp_path, small_mnist, capsys):
    out = tmp_path / "real.json"
    main(["eval", "--real", "--n", "500", "--data", small_mnist, "--classifier", SHIPPED, "--device", "cpu",
          "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert TABLE_HEADER in printed
    assert "| real digits (1,000 vs 1,000 for FID) | 2,000 |" in printed
    assert report["fid_halves"] == [1000, 1000] and report["subset"] == 500
    assert report["is"] > 9.0 and 0 < report["fid"] < report["fid_subset"] < 20.0
    assert report["command"].startswith("ddpm eval --real --n 500")
    # the memorization baseline: a real digit is never a copy of another (distances in [-1, 1] pixels)
    assert 3.0 < report["nn_distance"] < 15.0
    assert f"nearest of the other real digits: {report['nn_distance']:.3f}" in printed


def test_eval_samples_in_seeded_batches_and_crops_32px_images(monkeypatch, small_mnist, digits, capsys):
    calls = []
    # Unseen by the FID reference (the first 2,000) but from the same writers (MNIST's first 5,000 are
    # Census employees', the last 5,000 students'), padded as a DDPM trained at 32×32 would give them.
    fake_digits = pad_to(digits[0][2000:3000], 32)

    def generate(ckpt, *, n, steps, sampler, eta, variance, seed, callback, model):
        assert model is None  # the plain U-Net unless a fast path is asked for
        start = sum(c["n"] for c in calls)
        calls.append({"n": n, "seed": seed, "steps": steps, "sampler": sampler, "variance": variance})
        for i in range(steps):
            callback(i, None, None, None)
        return SimpleNamespace(images=fake_digits[start : start + n])

    scheduler = SimpleNamespace(num_train_timesteps=1000, variance_type="fixed_large")
    fake_ckpt = SimpleNamespace(channels=1, scheduler=scheduler)
    monkeypatch.setattr("app.nets.resolve_model", lambda ref, device: fake_ckpt, raising=False)
    monkeypatch.setattr("app.sampling.generate", generate)
    main(["eval", "--model", "fake", "--n", "1000", "--batch-size", "300", "--seed", "7",
          "--data", small_mnist, "--classifier", SHIPPED, "--device", "cpu"])  # fmt: skip
    printed = capsys.readouterr().out
    assert [c["n"] for c in calls] == [300, 300, 300, 100]
    assert len({c["seed"] for c in calls}) == 4  # a distinct noise stream for every batch
    assert all(c["steps"] == 1000 and c["sampler"] == "ddpm" and c["variance"] is None for c in calls)
    row = next(line for line in printed.splitlines() if line.startswith("| 1000-step ancestral, σ²=β |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[2] == "1,000" and float(cells[3]) > 9.0 and float(cells[4]) < 20.0 and cells[5] == "10/10"
    assert "--variance beta --seed 7 --batch-size 300" in row
    assert "median L2 pixel distance to the nearest of the real digits: " in printed


def test_eval_reports_samples_that_copy_the_reference_as_nearest_distance_zero(
    tmp_path, monkeypatch, small_mnist, digits
):
    copies = digits[0][:40]  # the first 40 digits of the FID reference, handed back as "samples"
    scheduler = SimpleNamespace(num_train_timesteps=1000, variance_type="fixed_large")
    fake_ckpt = SimpleNamespace(channels=1, scheduler=scheduler)
    monkeypatch.setattr("app.nets.resolve_model", lambda ref, device: fake_ckpt, raising=False)
    monkeypatch.setattr("app.sampling.generate", lambda ckpt, *, n, **kw: SimpleNamespace(images=copies[:n]))
    out = tmp_path / "copies.json"
    main(["eval", "--model", "fake", "--n", "40", "--batch-size", "40", "--data", small_mnist,
          "--classifier", SHIPPED, "--device", "cpu", "--json", str(out)])  # fmt: skip
    # zero up to cdist's matrix-product rounding, against about 6 between distinct real digits
    assert json.loads(out.read_text())["nn_distance"] == pytest.approx(0.0, abs=1e-4)


def test_eval_runs_a_real_sampler_on_a_tiny_32px_ddpm(tmp_path, small_mnist, capsys):
    from app.nets import SchedulerConfig, UNet, UNetConfig, save_checkpoint

    torch.manual_seed(0)
    cfg = UNetConfig.ddpm(resolution=32, in_channels=1, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                          attn_resolutions=(), dropout=0.0)  # fmt: skip
    save_checkpoint(tmp_path / "tiny", UNet(cfg), SchedulerConfig(num_train_timesteps=30))
    out, npy = tmp_path / "ddim.json", tmp_path / "samples.npy"
    main(["eval", "--model", str(tmp_path / "tiny"), "--n", "24", "--batch-size", "10", "--sampler", "ddim",
          "--steps", "3", "--data", small_mnist, "--classifier", SHIPPED, "--device", "cpu",
          "--json", str(out), "--npy", str(npy)])  # fmt: skip
    report = json.loads(out.read_text())
    samples = np.load(npy)
    assert samples.shape == (24, 1, 32, 32) and samples.dtype == np.float32 and np.abs(samples).max() <= 1.0
    assert report["n"] == 24 and sum(report["class_counts"]) == 24
    assert 1.0 <= report["is"] < 10.0 and report["fid"] > 0
    assert "| DDIM 3 steps, η=0 | 24 |" in capsys.readouterr().out


REPO = Path(__file__).resolve().parents[2]


def _sample_args(**fast):
    args = dict(model=str(REPO / "models" / "mnist"), n=12, batch_size=5, sampler="ddim", steps=3,
                eta=0.0, variance=None, seed=3, device="cpu", dtype="float32", channels_last=False,
                compile=False)  # fmt: skip
    return SimpleNamespace(**(args | fast))


@pytest.mark.parametrize(
    "fast, flags, tolerance",
    [
        ({"channels_last": True}, " --channels-last", 1e-4),
        ({"dtype": "bfloat16", "channels_last": True}, " --dtype bfloat16 --channels-last", 5e-2),
        pytest.param({"compile": True}, " --compile", 1e-4, marks=pytest.mark.slow),
    ],
)
def test_eval_samples_through_the_engines_fast_paths(fast, flags, tolerance):
    """`ddpm eval --dtype/--channels-last/--compile` samples through the engine's Forward; the images
    match the plain U-Net's, and the table row says how they were made."""
    from app.evaluation.cli import _sample

    plain, plain_label, plain_command = _sample(_sample_args())
    images, label, command = _sample(_sample_args(**fast))
    assert images.shape == plain.shape == (12, 1, 28, 28)
    assert (images - plain).abs().mean() < tolerance
    assert command == plain_command + flags
    assert label == plain_label + (", bfloat16" if "dtype" in fast else "")


def test_eval_refuses_float16_on_the_cpu():
    from app.cli import main as ddpm

    with pytest.raises(SystemExit, match="float16 needs a CUDA device"):
        ddpm(
            ["eval", "--n", "4", "--sampler", "ddim", "--steps", "2", "--dtype", "float16", "--device", "cpu"]
        )


def test_eval_real_names_n_when_it_is_past_half_the_digits(small_mnist):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "eval",
                "--real",
                "--n",
                "1001",
                "--data",
                small_mnist,
                "--classifier",
                SHIPPED,
                "--device",
                "cpu",
            ]
        )
    assert str(e.value.code).startswith("ddpm eval: --n 1001: with --real") and "2..1000" in str(e.value.code)


@pytest.mark.parametrize(
    ("words", "said"),
    [
        (
            ["--sampler", "ddim", "--steps", "5", "--seed", "3"],
            "--sampler, --steps, --seed: for samples of a model",
        ),
        (["--model", "models/other", "--variance", "beta"], "--model, --variance: for samples of a model"),
    ],
)
def test_eval_real_refuses_the_options_of_sampling_it_would_ignore(small_mnist, words, said):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--real", "--n", "4", "--data", small_mnist, "--classifier", SHIPPED, *words])
    assert str(e.value.code) == f"ddpm eval: {said}, not with --real"


@pytest.mark.parametrize(
    ("words", "said"),
    [
        (["--sampler", "ddpm", "--eta", "0.5"], "--eta 0.5 applies to --sampler ddim only"),
        (
            ["--sampler", "ddim", "--variance", "posterior"],
            "--variance posterior applies to --sampler ddpm only",
        ),
    ],
)
def test_eval_refuses_the_options_of_the_other_sampler(small_mnist, words, said):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--n", "4", "--data", small_mnist, "--classifier", SHIPPED, *words])
    assert str(e.value.code).startswith(f"ddpm eval: {said}")
