import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from app.cli import main
from app.nets import SchedulerConfig, UNet, load_checkpoint
from app.nets.convert import to_original_state_dict
from app.sampling import generate
from tests.tiny import TINY_CONFIG, save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"), timesteps=30)


def test_sample_writes_a_grid_and_float_values(tiny, tmp_path, capsys):
    out, npy = tmp_path / "grid.png", tmp_path / "x.npy"
    main(
        [
            "sample",
            "--model",
            str(tiny),
            "--n",
            "4",
            "--steps",
            "5",
            "--sampler",
            "ddim",
            "--seed",
            "3",
            "--out",
            str(out),
            "--npy",
            str(npy),
            "--device",
            "cpu",
        ]
    )
    assert "4 images, seed 3, 5 steps" in capsys.readouterr().out
    grid = Image.open(out)
    assert grid.size == (2 * 10 + 2, 2 * 10 + 2) and grid.mode == "L"
    values = np.load(npy)
    assert values.shape == (4, 1, 8, 8) and values.dtype == np.float32 and np.abs(values).max() <= 1
    # --sampler ddim was used: the values are the library's DDIM ones for that seed and steps, not
    # its DDPM ones (which a dropped --sampler, the default, would give).
    ckpt = load_checkpoint(tiny, device="cpu")
    ddim = generate(ckpt, n=4, steps=5, sampler="ddim", seed=3).images.numpy()
    ddpm = generate(ckpt, n=4, steps=5, sampler="ddpm", seed=3).images.numpy()
    assert np.abs(ddim - ddpm).max() > 0.1
    np.testing.assert_allclose(values, ddim, rtol=0, atol=1e-5)


def test_sample_shows_a_progress_bar_and_clear_errors(tiny, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "sample",
            "--model",
            str(tiny),
            "--n",
            "1",
            "--steps",
            "3",
            "--out",
            str(tmp_path / "g.png"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "3/3" in run.stderr  # tqdm's bar
    bad = subprocess.run(
        [sys.executable, "-m", "app.cli", "sample", "--model", str(tmp_path / "none"), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "ddpm sample:" in bad.stderr and "not a checkpoint folder" in bad.stderr
    steps = subprocess.run(
        [sys.executable, "-m", "app.cli", "sample", "--model", str(tiny), "--steps", "31", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert steps.returncode == 1 and "steps" in steps.stderr


def test_convert_original_checkpoint(tmp_path, monkeypatch):
    from app.nets import presets

    cfg = replace(TINY_CONFIG, in_channels=3, out_channels=3)
    small = presets.Preset(
        name="small",
        unet=cfg,
        scheduler=SchedulerConfig(variance_type="fixed_large"),
        hub_repo="none/none",
        description="test",
    )
    monkeypatch.setitem(presets.PRESETS, "small", small)
    unet = UNet(cfg)
    torch.save(to_original_state_dict(unet.state_dict(), cfg), tmp_path / "model.ckpt")
    main(
        [
            "convert",
            "--preset",
            "small",
            "--weights",
            str(tmp_path / "model.ckpt"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    loaded = load_checkpoint(tmp_path / "o")
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([3])
    torch.testing.assert_close(loaded.unet(x, t), unet(x, t))


def test_train_stops_at_its_time_limit_and_refuses_a_bad_one(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=(rng.uniform(0, 1, (16, 8, 8)) > 0.5).astype(np.uint8) * 255)
    words = ["train", "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "run"), "--ch", "32"]
    words += ["--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-resolutions", "4", "--steps", "1000"]
    words += ["--batch-size", "4", "--preview-every", "0", "--device", "cpu"]
    with pytest.raises(SystemExit, match="--max-minutes must be positive"):
        main([*words, "--max-minutes", "0"])
    main([*words, "--max-minutes", "0.0001"])
    record = (tmp_path / "run" / "model" / "training.json").read_text()
    assert '"step": 1,' in record


@pytest.mark.parametrize(
    ("words", "says"),
    [
        (["sample", "--n", "0"], "argument --n: must be at least 1, got 0"),
        (["sample", "--steps", "0"], "argument --steps: must be at least 1"),
        (["sample", "--sampler", "ddim", "--eta", "nan"], "argument --eta: must lie in [0, 1], got nan"),
        (["sample", "--eta", "-1"], "argument --eta: must lie in [0, 1]"),
        (["sample", "--device", "foo"], "'foo' is not a torch device"),
        (["sample", "--device", "cuda:64"], "CUDA device(s)"),
        (["--log-level", "loud", "sample"], "argument --log-level: invalid choice"),
        (
            ["train", "--data", "d", "--out", "o", "--ema-decay", "2"],
            "argument --ema-decay: must lie in [0, 1)",
        ),
        (
            ["train", "--data", "d", "--out", "o", "--checkpoint-every", "0"],
            "--checkpoint-every: must be at least 1",
        ),
        (["train", "--data", "d", "--out", "o", "--warmup", "-5"], "--warmup: must be 0 or more"),
        (["train", "--data", "d", "--out", "o", "--batch-size", "0"], "--batch-size: must be at least 1"),
        # 0 or less would stop training, or reverse it (a negative norm bound flips the gradient), silently
        (
            ["train", "--data", "d", "--out", "o", "--grad-clip", "-1"],
            "--grad-clip: must be a finite number above 0",
        ),
        (
            ["train", "--data", "d", "--out", "o", "--grad-clip", "0"],
            "--grad-clip: must be a finite number above 0",
        ),
        (["train", "--data", "d", "--out", "o", "--lr", "0"], "--lr: must be a finite number above 0"),
        (["train", "--data", "d", "--out", "o", "--lr", "nan"], "--lr: must be a finite number above 0"),
        (
            ["train", "--data", "d", "--out", "o", "--num-res-blocks", "0"],
            "--num-res-blocks: must be at least 1",
        ),
        (["train", "--data", "d", "--out", "o", "--norm-groups", "0"], "--norm-groups: must be at least 1"),
        (["train", "--data", "d", "--out", "o", "--dropout", "1"], "--dropout: must lie in [0, 1)"),
        (["eval", "--batch-size", "0"], "--batch-size: must be at least 1"),
        (["train-classifier", "--data", "d", "--out", "o", "--epochs", "0"], "--epochs: must be at least 1"),
        (["remote", "sample", "--n", "0"], "--n: must be at least 1"),
    ],
)
def test_bad_option_values_are_usage_errors_naming_the_option(words, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(words)
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_unwritable_outputs_are_refused_before_any_work(tiny, tmp_path):
    common = ["--model", str(tiny), "--n", "1", "--steps", "2", "--device", "cpu"]
    for words, says in (
        (["--out", str(tmp_path / "nowhere" / "g.png")], "does not exist"),
        (["--out", str(tmp_path)], "is a folder; give a file name"),
        (["--out", str(tmp_path / "g.png"), "--npy", str(tmp_path / "nowhere" / "x.npy")], "--npy"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["sample", *common, *words])
        assert says in str(exit_.value.code)
    assert not (tmp_path / "g.png").exists()  # nothing half-written: the PNG waits for the --npy check
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match="is a file; give a folder"):
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "a-file"), "--steps", "1"])
    with pytest.raises(SystemExit, match="--json"):
        main(["eval", "--real", "--n", "4", "--json", str(tmp_path / "nowhere" / "x.json")])


def test_the_eta_of_ddim_is_refused_with_the_ancestral_sampler(tiny, tmp_path):
    with pytest.raises(SystemExit, match=r"--eta 0\.5 applies to --sampler ddim only"):
        main(
            [
                "sample",
                "--model",
                str(tiny),
                "--eta",
                "0.5",
                "--out",
                str(tmp_path / "g.png"),
                "--device",
                "cpu",
            ]
        )


def test_a_failed_training_run_leaves_no_empty_run_folder(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="ddpm train:"):
        main(["train", "--data", str(tmp_path / "no-such-data"), "--out", str(out), "--steps", "1"])
    assert not out.exists()


def test_ctrl_c_ends_sampling_with_one_line_and_status_130(tmp_path):
    import signal

    model = save_tiny(tmp_path / "long", timesteps=20_000)  # a chain long enough to interrupt
    command = [sys.executable, "-m", "app.cli", "sample", "--model", str(model), "--n", "1"]
    process = subprocess.Popen(
        [*command, "--out", str(tmp_path / "g.png"), "--device", "cpu"],
        stderr=subprocess.PIPE,
        # As a terminal starts it: a suite run in the background of a non-interactive shell inherits
        # SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = b""
    while b"step/s" not in seen[-200:]:  # the progress bar is up: sampling has begun
        chunk = process.stderr.read(1)
        assert chunk, seen.decode(errors="replace")
        seen += chunk
    process.send_signal(signal.SIGINT)
    err = (seen + process.stderr.read()).decode(errors="replace")
    assert process.wait(timeout=60) == 130, err
    assert "ddpm sample: interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()
