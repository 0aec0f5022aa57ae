import json

import numpy as np
import pytest
import torch

from app.nets import load_checkpoint
from app.training.data import DataError
from app.training.train import TrainConfig, Trainer, default_norm_groups, ema_decay_at, ema_update, lr_at


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


def test_the_default_norm_groups_keep_channels_a_group_and_too_few_warn(digits, tmp_path, caplog):
    assert [default_norm_groups(c) for c in (32, 64, 128, 256, 4, 2, 50)] == [8, 16, 32, 32, 1, 1, 10]
    trainer = Trainer(_config(digits, tmp_path / "a", steps=1))  # no norm_num_groups: ch 32 -> 8
    assert trainer.cfg.norm_num_groups == trainer.unet_config.norm_num_groups == 8
    assert trainer.model.conv_norm_out.num_groups == 8
    assert "GroupNorm groups" not in caplog.text
    with caplog.at_level("WARNING", logger="app.training.train"):
        paper = Trainer(
            _config(digits, tmp_path / "b", steps=1, norm_num_groups=32)
        )  # honoured, with a warning
    assert paper.model.conv_norm_out.num_groups == 32
    assert "32 GroupNorm groups for 32 channels: fewer than 2 channels a group" in caplog.text
    paper.run()
    # a run saved with 32 groups resumes without --norm-groups: it keeps its own, no clash
    assert Trainer(_config(digits, tmp_path / "b", steps=2)).model.conv_norm_out.num_groups == 32


@pytest.mark.parametrize("recorded", [True, False])
def test_a_run_saved_on_another_kind_of_device_resumes_with_a_warning(digits, tmp_path, caplog, recorded):
    out = tmp_path / "run"
    Trainer(_config(digits, out, steps=2)).run()
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["generator_device"] == "cpu" and "cuda_rng" not in state  # CPU runs save no CUDA state
    state["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA (Philox) generator's state
    if recorded:
        state["generator_device"] = "cuda"
    else:  # a run saved before the device was recorded
        del state["generator_device"]
    torch.save(state, out / "state.pt")
    with caplog.at_level("WARNING", logger="app.training.train"):
        resumed = Trainer(_config(digits, out, steps=3))
    assert "noise generator was saved on" in caplog.text and "this run is on cpu" in caplog.text
    resumed.run()
    assert resumed.step == 3


def test_a_crash_between_the_writes_of_a_checkpoint_leaves_no_stale_model(digits, tmp_path, monkeypatch):
    out = tmp_path / "run"
    Trainer(_config(digits, out, steps=2)).run()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr("app.training.train.save_checkpoint", crash)
        with pytest.raises(OSError, match="disk full"):
            Trainer(_config(digits, out, steps=4)).run()
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 2  # state.pt is written last
    Trainer(_config(digits, out, steps=4)).run()  # the same command, rerun
    assert json.loads((out / "model" / "training.json").read_text())["step"] == 4
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 4
    # a model/ that is behind state.pt anyway (a run of the older write order) is written again
    record = out / "model" / "training.json"
    record.write_text(record.read_text().replace('"step": 4', '"step": 2'))
    Trainer(_config(digits, out, steps=4)).run()
    assert json.loads(record.read_text())["step"] == 4


def test_a_non_finite_gradient_stops_before_the_update(digits, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(_config(digits, out, steps=4))
    trainer.run()
    trainer.cfg.steps = 6
    before = [p.detach().clone() for p in [*trainer.model.parameters(), *trainer.ema.parameters()]]
    weight = trainer.model.conv_out.weight
    weight.register_hook(lambda g: g * float("nan"))  # the loss stays finite, one gradient does not
    with pytest.raises(FloatingPointError, match="gradient norm is nan at step 4"):
        trainer.run()
    after = [*trainer.model.parameters(), *trainer.ema.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(before, after, strict=True))
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 4 and all(v.isfinite().all() for v in state["model"].values())


def test_ddpm_train_reports_a_non_finite_step_in_one_line(digits, tmp_path, monkeypatch):
    from app.cli import main

    def diverged(self, x0):
        raise FloatingPointError(f"loss is nan at step {self.step}; lower --lr")

    monkeypatch.setattr(Trainer, "train_step", diverged)
    words = ["train", "--data", str(digits), "--out", str(tmp_path / "run"), "--ch", "32", "--ch-mult", "1,2"]
    words += ["--num-res-blocks", "1", "--attn-resolutions", "4", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        main(words)
    # The run as it was (step 0: the initial weights) is saved, and the same command resumes from it.
    assert e.value.code == f"ddpm train: loss is nan at step 0; lower --lr; {tmp_path / 'run'} holds step 0"


def test_a_non_finite_step_after_good_ones_saves_them_first(digits, tmp_path):
    """The steps since the last checkpoint are good (the failed one changed nothing): they are saved
    before the run stops, not lost to the checkpoint interval."""
    out = tmp_path / "run"
    trainer = Trainer(_config(digits, out, steps=4))
    trainer.run()
    trainer.cfg.steps, trainer.cfg.checkpoint_every = 10, 100
    trainer.model.conv_out.weight.register_hook(lambda g: g * float("nan") if trainer.step == 6 else g)
    with pytest.raises(FloatingPointError, match="at step 6"):
        trainer.run()
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 6 and all(v.isfinite().all() for v in state["model"].values())
    assert json.loads((out / "model" / "training.json").read_text())["step"] == 6


def test_a_run_from_a_model_goes_on_with_its_ema_warm_up(digits, tmp_path, monkeypatch):
    model = Trainer(_config(digits, tmp_path / "first", steps=2)).run()
    decays = []
    monkeypatch.setattr("app.training.train.ema_update", lambda ema, net, decay: decays.append(decay))
    Trainer(_config(digits, tmp_path / "second", steps=1, ema_decay=0.999, init_from=str(model))).run()
    assert decays == [ema_decay_at(2, 0.999)]  # counted from the 2 steps the model had, not from 0
    (model / "training.json").unlink()  # a model with no record of its training: warmed up already
    Trainer(_config(digits, tmp_path / "third", steps=1, ema_decay=0.999, init_from=str(model))).run()
    assert decays[1] == 0.999
    Trainer(_config(digits, tmp_path / "plain", steps=1, ema_decay=0.999)).run()
    assert decays[2] == ema_decay_at(0, 0.999)  # a new run warms up from its step 0 as before


def test_a_run_from_a_model_refuses_another_noise_schedule(digits, tmp_path, caplog):
    model = str(Trainer(_config(digits, tmp_path / "first", steps=1)).run())
    for other in (dict(beta_schedule="cosine"), dict(num_timesteps=60), dict(beta_end=0.03)):
        with pytest.raises(SystemExit, match="another noise schedule"):
            Trainer(_config(digits, tmp_path / "next", steps=1, init_from=model, **other))
    with caplog.at_level("WARNING", logger="app.training.train"):
        Trainer(_config(digits, tmp_path / "next", steps=1, init_from=model, variance_type="fixed_small"))
    assert "samples with variance_type fixed_large" in caplog.text


def test_a_resume_names_a_changed_variance_type(digits, tmp_path, caplog):
    Trainer(_config(digits, tmp_path / "run", steps=1)).run()
    with caplog.at_level("WARNING", logger="app.training.train"):
        Trainer(_config(digits, tmp_path / "run", steps=2, variance_type="fixed_small"))
    assert "changed settings: variance_type 'fixed_large' -> 'fixed_small'" in caplog.text


def test_a_resume_on_other_data_drops_the_epoch_under_way(digits, tmp_path, caplog):
    out = tmp_path / "run"
    Trainer(_config(digits, out, steps=1)).run()  # 8 of the 40 digits drawn, 32 indices to go
    assert len(torch.load(out / "state.pt", weights_only=True)["order"]) == 32
    with caplog.at_level("WARNING", logger="app.training.train"):
        fewer = Trainer(_config(digits, out, steps=2, holdout=list(range(20))))
    assert "the data holds 20 images now (40 before)" in caplog.text and len(fewer.order) == 0
    fewer.run()
    assert fewer.step == 2 and int(fewer.order.max()) < 20
    rng = np.random.default_rng(1)
    np.savez(digits, images=(rng.uniform(0, 1, (60, 8, 8)) > 0.6).astype(np.uint8) * 255)
    more = Trainer(_config(digits, out, steps=3, holdout=list(range(20))))  # 40 of 60 after the holdout
    assert len(more.order) == 0


def test_odd_padding_is_refused_at_train_time(digits, tmp_path):
    with pytest.raises(DataError, match="--resolution 9 would pad 8×8 images unevenly"):
        Trainer(_config(digits, tmp_path / "odd", resolution=9, ch_mult=(1,), attn_resolutions=(9,)))
    assert not (tmp_path / "odd").exists()
    assert (
        Trainer(_config(digits, tmp_path / "even", resolution=16, attn_resolutions=(8,))).data.shape[-1] == 16
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_run_saves_and_restores_the_cuda_generator(digits, tmp_path):
    out = tmp_path / "run"
    Trainer(_config(digits, out, steps=2, device="cuda")).run()  # dropout draws from the CUDA generator
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["generator_device"] == "cuda" and "cuda_rng" in state
    torch.cuda.manual_seed(123)
    Trainer(_config(digits, out, steps=3, device="cuda"))
    assert torch.equal(torch.cuda.get_rng_state(), state["cuda_rng"])
