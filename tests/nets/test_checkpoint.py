"""Checkpoint folders: ours load in diffusers, diffusers' (2022-era too) load in ours, bad ones fail."""

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

from app.nets.checkpoint import (
    Checkpoint,
    CheckpointError,
    SchedulerConfig,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
    unet_from_state_dict,
)
from app.nets.unet import UNet
from app.sampling import schedule_from

SCHEDULER = SchedulerConfig(variance_type="fixed_small")


@pytest.fixture
def x_t():
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    return x, torch.tensor([12, 730])


@pytest.fixture
def diffusers_unet(small_config, randomize):
    torch.manual_seed(0)
    return randomize(UNet2DModel.from_config(small_config.to_dict()), 0)


def eps(model, x_t):
    with torch.no_grad():
        out = model(*x_t)
    return out if isinstance(out, torch.Tensor) else out.sample


def test_saved_checkpoint_loads_in_diffusers(tmp_path, random_unet, x_t):
    unet = random_unet()
    save_checkpoint(tmp_path / "ckpt", unet, SCHEDULER)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "scheduler_config.json",
    ]
    theirs = UNet2DModel.from_pretrained(tmp_path / "ckpt").eval()
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "ckpt")
    assert scheduler.config.variance_type == "fixed_small"
    torch.testing.assert_close(eps(theirs, x_t), eps(unet, x_t), rtol=1e-5, atol=1e-5)


def test_save_then_load_is_exact(tmp_path, random_unet, x_t):
    unet = random_unet()
    save_checkpoint(tmp_path, unet, SCHEDULER)
    ckpt = load_checkpoint(tmp_path)
    assert isinstance(ckpt, Checkpoint)
    assert (ckpt.scheduler, ckpt.unet.config, ckpt.resolution, ckpt.channels) == (
        SCHEDULER,
        unet.config,
        28,
        1,
    )
    assert ckpt.num_parameters == unet.num_parameters()
    assert not ckpt.unet.training
    assert torch.equal(eps(ckpt.unet, x_t), eps(unet, x_t))


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("layout", ["top-level", "pipeline"])
def test_diffusers_folders_load(tmp_path, diffusers_unet, x_t, layout, safe_serialization):
    scheduler = DDPMScheduler.from_config(SCHEDULER.to_dict())
    if layout == "pipeline":
        DDPMPipeline(diffusers_unet, scheduler).save_pretrained(
            tmp_path, safe_serialization=safe_serialization
        )
        assert (tmp_path / "model_index.json").is_file() and (tmp_path / "unet").is_dir()
    else:
        diffusers_unet.save_pretrained(tmp_path, safe_serialization=safe_serialization)
        scheduler.save_pretrained(tmp_path)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.scheduler == SCHEDULER
    torch.testing.assert_close(eps(ckpt.unet, x_t), eps(diffusers_unet, x_t), rtol=1e-5, atol=1e-5)


def test_legacy_attention_names_load(tmp_path, diffusers_unet, x_t):
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in diffusers_unet.state_dict().items():
        for new, old in legacy.items():
            key = key.replace(f".{new}.", f".{old}.")
        state[key] = value
    assert "mid_block.attentions.0.proj_attn.weight" in state
    diffusers_unet.save_config(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SCHEDULER.to_dict()))
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    ckpt = load_checkpoint(tmp_path)
    torch.testing.assert_close(eps(ckpt.unet, x_t), eps(diffusers_unet, x_t), rtol=1e-5, atol=1e-5)


def test_safetensors_preferred_and_scheduler_override(tmp_path, random_unet, x_t):
    unet, other = random_unet(seed=1), random_unet(seed=2)
    save_checkpoint(tmp_path, unet, SCHEDULER)
    torch.save(other.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "scheduler_config.json").unlink()
    override = SchedulerConfig(num_train_timesteps=500)
    ckpt = load_checkpoint(tmp_path, scheduler=override)
    assert ckpt.scheduler == override
    assert torch.equal(eps(ckpt.unet, x_t), eps(unet, x_t))


@pytest.fixture
def saved(tmp_path, random_unet):
    unet = random_unet()
    save_checkpoint(tmp_path, unet, SCHEDULER)
    return tmp_path, unet.state_dict()


def rewrite_weights(folder, state):
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")


def error_of(path, **kwargs):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, **kwargs)
    return str(e.value)


def test_missing_key(saved):
    folder, state = saved
    del state["mid_block.attentions.0.to_k.bias"]
    rewrite_weights(folder, state)
    message = error_of(folder)
    assert "1 missing keys: mid_block.attentions.0.to_k.bias" in message
    assert "diffusion_pytorch_model.safetensors" in message


def test_unexpected_key(saved):
    folder, state = saved
    state["mid_block.attentions.0.rotary.weight"] = torch.zeros(3)
    rewrite_weights(folder, state)
    assert "1 unexpected keys: mid_block.attentions.0.rotary.weight" in error_of(folder)


def test_wrong_shape(saved):
    folder, state = saved
    state["conv_out.weight"] = torch.zeros(3, 32, 3, 3)
    rewrite_weights(folder, state)
    assert "conv_out.weight expected (1, 32, 3, 3) found (3, 32, 3, 3)" in error_of(folder)


def test_config_that_does_not_match_the_weights(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"block_out_channels": [64, 128, 128]}))
    message = error_of(folder)
    assert "do not match the config" in message
    assert "conv_in.weight expected (64, 1, 3, 3) found (32, 1, 3, 3)" in message


def test_unsupported_config_value_names_the_file(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"time_embedding_type": "fourier"}))
    message = error_of(folder)
    assert str(folder / "config.json") in message and "'time_embedding_type' = 'fourier'" in message


def test_a_learned_variance_head_is_refused_at_load(tmp_path, small_config, randomize):
    """out_channels = 2 × in_channels (ε and a variance): a fine network, but not an ε_θ this service can
    step with; refused when it loads, not at every request."""
    config = small_config.to_dict() | {"out_channels": 2 * small_config.in_channels}
    randomize(UNet2DModel.from_config(config), 0).save_pretrained(tmp_path)
    DDPMScheduler(variance_type="fixed_small").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    assert "'out_channels' = 2 is not supported" in str(e.value) and "learned-variance" in str(e.value)


def test_pickle_named_safetensors(saved):
    folder, state = saved
    torch.save(state, folder / "diffusion_pytorch_model.safetensors")
    assert "diffusion_pytorch_model.safetensors: not a safetensors file" in error_of(folder)


class Payload:
    """Stands for any object whose unpickling would run code."""


def test_pickle_with_code_is_refused(saved):
    folder, state = saved
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"state_dict": state, "extra": Payload()}, folder / "diffusion_pytorch_model.bin")
    message = error_of(folder)
    assert "diffusion_pytorch_model.bin: refused" in message and "arbitrary code" in message
    assert "weights_only=False" not in message  # torch's advice to run the file's code is not passed on


def test_a_file_that_is_no_pickle_is_not_called_malicious(saved):
    folder, _ = saved
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"<html><body>404 Not Found</body></html>")
    message = error_of(folder)
    assert "not a readable PyTorch weights file (corrupt, truncated, or another kind of file" in message
    assert "arbitrary code" not in message and "weights_only=False" not in message


def test_training_checkpoint_is_not_a_state_dict(saved):
    folder, state = saved
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"model": state, "step": 790000}, folder / "diffusion_pytorch_model.bin")
    message = error_of(folder)
    assert (
        "diffusion_pytorch_model.bin: expected a state_dict (a dict of tensors), but 'model' holds" in message
    )


def test_loaded_weights_are_copies(small_config, random_unet):
    unet = random_unet()
    copy = unet_from_state_dict(small_config, unet.state_dict(), source="live model")
    with torch.no_grad():
        unet.conv_in.weight.zero_()
    assert copy.conv_in.weight.abs().sum() > 0


def test_missing_files_and_folders(saved, tmp_path):
    folder, _ = saved
    assert "no such folder" in error_of(tmp_path / "absent")
    assert "not a folder" in error_of(folder / "config.json")
    (folder / "scheduler_config.json").unlink()
    assert "no scheduler_config.json (nor scheduler/scheduler_config.json)" in error_of(folder)
    (folder / "config.json").unlink()
    assert "no config.json (nor unet/config.json)" in error_of(folder)


def test_missing_weights(saved):
    folder, _ = saved
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    said = error_of(folder)
    assert said == (
        f"{folder}: no diffusion_pytorch_model.safetensors, diffusion_pytorch_model.bin, "
        "diffusion_pytorch_model.fp16.safetensors or diffusion_pytorch_model.fp16.bin next to config.json"
    )
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "ema.ckpt").write_bytes(b"")
    assert error_of(folder) == f"{said}; found ema.ckpt, model.safetensors"


def test_loads_onto_the_requested_device_in_float32(tmp_path, random_unet):
    unet = random_unet().to(torch.float16)
    save_checkpoint(tmp_path, unet, SCHEDULER)
    ckpt = load_checkpoint(tmp_path, device="cpu")
    assert {p.dtype for p in ckpt.unet.parameters()} == {torch.float32}
    assert {p.device.type for p in ckpt.unet.parameters()} == {"cpu"}
    assert isinstance(ckpt.unet, UNet)


def test_a_cosine_schedule_is_saved_as_diffusers_names_it(tmp_path, random_unet):
    from app.training.train import TrainConfig

    scheduler = TrainConfig(data="-", out="-", beta_schedule="cosine").scheduler_config()
    save_checkpoint(tmp_path, random_unet(), scheduler)
    assert (
        json.loads((tmp_path / "scheduler_config.json").read_text())["beta_schedule"] == "squaredcos_cap_v2"
    )
    theirs = DDPMScheduler.from_pretrained(tmp_path)
    ours = schedule_from(load_checkpoint(tmp_path).scheduler)
    torch.testing.assert_close(ours.betas.float(), theirs.betas, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.betas, schedule_from(SchedulerConfig(beta_schedule="cosine")).betas)


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("layout", ["top-level", "pipeline"])
def test_fp16_variant_weights_load_as_float32(tmp_path, diffusers_unet, x_t, layout, safe_serialization):
    half = diffusers_unet.to(torch.float16)
    scheduler = DDPMScheduler.from_config(SCHEDULER.to_dict())
    save = {"safe_serialization": safe_serialization, "variant": "fp16"}
    if layout == "pipeline":
        DDPMPipeline(half, scheduler).save_pretrained(tmp_path, **save)
        folder = tmp_path / "unet"
    else:
        half.save_pretrained(tmp_path, **save)
        scheduler.save_pretrained(tmp_path)
        folder = tmp_path
    suffix = "safetensors" if safe_serialization else "bin"
    assert [p.name for p in folder.glob("diffusion_pytorch_model*")] == [
        f"diffusion_pytorch_model.fp16.{suffix}"
    ]
    ckpt = load_checkpoint(tmp_path)
    assert {p.dtype for p in ckpt.unet.parameters()} == {torch.float32}
    state = ckpt.unet.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in half.state_dict().items())
    torch.testing.assert_close(eps(ckpt.unet, x_t), eps(half.float(), x_t), rtol=1e-5, atol=1e-5)


def test_plain_weights_are_preferred_over_the_fp16_variant(tmp_path, random_unet, x_t):
    unet, other = random_unet(seed=1), random_unet(seed=2)
    save_checkpoint(tmp_path, unet, SCHEDULER)
    save_file(other.half().state_dict(), tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    assert torch.equal(eps(load_checkpoint(tmp_path).unet, x_t), eps(unet, x_t))


def test_sharded_weights_are_named(tmp_path, diffusers_unet):
    diffusers_unet.save_pretrained(tmp_path, max_shard_size="300KB")
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SCHEDULER.to_dict()))
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    said = error_of(tmp_path)
    assert "found diffusion_pytorch_model.safetensors.index.json: sharded weights" in said


TF_RELEASE = ("model.ckpt-790000.data-00000-of-00001", "model.ckpt-790000.index", "model.ckpt-790000.meta")


def test_tensorflow_checkpoints_are_recognised(tmp_path, saved):
    release = tmp_path / "diffusion_cifar10_model"
    release.mkdir()
    for name in TF_RELEASE:
        (release / name).write_bytes(b"\x00\x01 not a pickle")  # torch.load: "Unsupported operand"
    advice = "TensorFlow checkpoints (the paper's original release) must be converted to PyTorch first"
    for path in (*(release / name for name in TF_RELEASE), release / "model.ckpt-790000"):
        with pytest.raises(CheckpointError) as e:
            read_state_dict(path)
        assert str(e.value).startswith(f"{path}: a TensorFlow checkpoint, not PyTorch weights. {advice}")
        assert "pesser/pytorch_diffusion" in str(e.value) and "Unsupported operand" not in str(e.value)
    said = error_of(release)  # the release folder given as a checkpoint folder
    assert said.startswith(f"{release}: holds model.ckpt-790000.data-00000-of-00001, ") and advice in said
    folder, _ = saved  # beside a config.json, in place of the weights
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    for name in TF_RELEASE:
        (folder / name).write_bytes(b"")
    assert advice in error_of(folder)


def test_a_data_parallel_prefix_is_removed(tmp_path, random_unet):
    state = random_unet().state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "dp.pt")
    read = read_state_dict(tmp_path / "dp.pt")
    assert read.keys() == state.keys() and all(torch.equal(read[k], v) for k, v in state.items())
    partly = {f"module.{k}" if k.startswith("conv_in.") else k: v for k, v in state.items()}
    torch.save(partly, tmp_path / "partly.pt")
    assert read_state_dict(tmp_path / "partly.pt").keys() == partly.keys()  # not DataParallel's: kept
