import json

import numpy as np
import pytest
import torch

from app.nets import load_checkpoint
from app.training.train import TrainConfig, Trainer, ema_decay_at, ema_update, lr_at


@pytest.fixture
def digits(tmp_path):
    """A small .npz dataset of 8×8 greyscale blobs."""
    rng = np.random.default_rng(0)
    images = (rng.uniform(0, 1, (40, 8, 8)) > 0.6).astype(np.uint8) * 255
    path = tmp_path / "data.npz"
    np.savez(path, images=images)
    return path


def _config(data, out, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.1,
        num_timesteps=50,
        batch_size=8,
        lr=1e-3,
        warmup=2,
        checkpoint_every=2,
        preview_every=0,
        hflip=True,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_interrupted_run_resumes_to_the_same_weights(digits, tmp_path):
    straight = Trainer(_config(digits, tmp_path / "a", steps=5))
    straight.run()
    Trainer(_config(digits, tmp_path / "b", steps=3)).run()
    resumed = Trainer(_config(digits, tmp_path / "b", steps=5))
    assert resumed.step == 3
    resumed.run()
    for (name, p), q in zip(
        straight.ema.state_dict().items(), resumed.ema.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_run_writes_a_loadable_ema_model_and_previews(digits, tmp_path):
    out = tmp_path / "run"
    model = Trainer(_config(digits, out, steps=4, preview_every=4, preview_steps=3)).run()
    ckpt = load_checkpoint(model)
    assert ckpt.resolution == 8 and ckpt.channels == 1 and ckpt.scheduler.num_train_timesteps == 50
    assert json.loads((model / "training.json").read_text())["step"] == 4
    assert (out / "previews" / "step-0000004.png").exists()
    x = torch.randn(2, 1, 8, 8)
    assert ckpt.unet(x, torch.tensor([0, 49])).shape == (2, 1, 8, 8)


def test_loss_goes_down_on_a_fixed_batch(digits, tmp_path):
    trainer = Trainer(
        _config(
            digits,
            tmp_path / "c",
            steps=60,
            batch_size=40,
            lr=2e-3,
            hflip=False,
            checkpoint_every=1000,
            dropout=0.0,
        )
    )
    from app.training.train import training_loss

    def loss() -> float:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return float(training_loss(trainer.model, trainer.schedule, trainer.data, g))

    before = loss()
    trainer.run()
    assert loss() < 0.7 * before


def test_resume_refuses_another_architecture(digits, tmp_path):
    Trainer(_config(digits, tmp_path / "d", steps=2)).run()
    with pytest.raises(SystemExit, match="other settings"):
        Trainer(_config(digits, tmp_path / "d", steps=4, ch=64))


def test_schedules_of_lr_and_ema():
    cfg = TrainConfig(data="x", out="y", lr=1e-3, warmup=10)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(1000, cfg) == pytest.approx(1e-3)
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(10**6, 0.999) == 0.999
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = [0.9 * pa + 0.1 * pb for pa, pb in zip(a.parameters(), b.parameters(), strict=True)]
    ema_update(a, b, 0.9)
    for p, e in zip(a.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e.detach())


def test_a_new_run_can_start_from_a_saved_model(digits, tmp_path):
    first = Trainer(_config(digits, tmp_path / "e", steps=2))
    model = first.run()
    second = Trainer(_config(digits, tmp_path / "f", steps=4, init_from=str(model)))
    assert second.step == 0
    for p, q in zip(first.ema.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(SystemExit, match="another architecture"):
        Trainer(_config(digits, tmp_path / "g", steps=4, ch=64, init_from=str(model)))


def test_norm_groups_reach_the_network(digits, tmp_path):
    trainer = Trainer(_config(digits, tmp_path / "h", steps=1, norm_num_groups=8))
    assert trainer.unet_config.norm_num_groups == 8
    assert trainer.model.conv_norm_out.num_groups == 8


def test_a_time_limit_stops_after_the_current_step_saved_and_resumable(digits, tmp_path):
    out = tmp_path / "timed"
    Trainer(_config(digits, out, steps=50)).run(max_seconds=0)
    record = json.loads((out / "model" / "training.json").read_text())
    assert record["step"] == 1
    resumed = Trainer(_config(digits, out, steps=3))
    assert resumed.step == 1
    resumed.run()
    assert resumed.step == 3


def test_totals_count_the_runs_a_model_started_from(digits, tmp_path):
    first = Trainer(_config(digits, tmp_path / "p", steps=2)).run()
    second = Trainer(_config(digits, tmp_path / "q", steps=3, init_from=str(first))).run()
    third_out = tmp_path / "r"
    Trainer(_config(digits, third_out, steps=1, init_from=str(second))).run()
    a, b, c = (json.loads((p / "training.json").read_text()) for p in (first, second, third_out / "model"))
    assert (a["total_step"], b["total_step"], c["total_step"]) == (2, 5, 6)
    assert c["total_train_seconds"] >= c["train_seconds"] + a["train_seconds"]
    # a resumed run keeps the totals it started with, even if the source folder changed since
    (second / "training.json").unlink()
    resumed = Trainer(_config(digits, third_out, steps=2, init_from=str(second)))
    resumed.run()
    assert json.loads((third_out / "model" / "training.json").read_text())["total_step"] == 7


def test_bfloat16_autocast_trains_float32_weights_near_the_float32_run(digits, tmp_path):
    plain = Trainer(_config(digits, tmp_path / "fp32", steps=3, dropout=0.0))
    plain.run()
    mixed = Trainer(_config(digits, tmp_path / "bf16", steps=3, dropout=0.0, dtype="bfloat16"))
    model = mixed.run()
    assert all(p.dtype == torch.float32 for p in [*mixed.model.parameters(), *mixed.ema.parameters()])
    # Adam moves a weight by at most about lr a step: 3 steps of lr ≤ 1e-3 apart from float32 by < 6e-3,
    # and autocast did run (the weights are not bit-equal)
    pairs = zip(plain.model.parameters(), mixed.model.parameters(), strict=True)
    gap = max((p - q).abs().max().item() for p, q in pairs)
    assert 0 < gap < 6e-3
    assert json.loads((model / "training.json").read_text())["config"]["dtype"] == "bfloat16"


def test_training_dtypes_are_checked_and_emulated_bfloat16_warns(digits, tmp_path, monkeypatch, caplog):
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        Trainer(_config(digits, tmp_path / "f16", dtype="float16"))
    assert not (tmp_path / "f16").exists()
    monkeypatch.setattr("app.training.train.cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="app.training.train"):
        Trainer(_config(digits, tmp_path / "emulated", dtype="bfloat16", steps=1)).run()
    assert "emulated" in caplog.text
    with caplog.at_level("WARNING", logger="app.training.train"):  # resumed without --dtype bfloat16
        Trainer(_config(digits, tmp_path / "emulated", steps=2))
    assert "was trained in bfloat16 so far; it goes on in float32" in caplog.text


def test_a_run_resumed_with_other_data_or_optimiser_settings_warns_naming_them(digits, tmp_path, caplog):
    Trainer(_config(digits, tmp_path / "run", steps=1)).run()
    with caplog.at_level("WARNING", logger="app.training.train"):
        Trainer(_config(digits, tmp_path / "run", steps=2))  # only steps changed: the normal way to go on
    assert "changed settings" not in caplog.text
    with caplog.at_level("WARNING", logger="app.training.train"):
        Trainer(_config(digits, tmp_path / "run", steps=2, lr=1e-5))
    assert "goes on with changed settings: lr" in caplog.text and "-> 1e-05" in caplog.text
