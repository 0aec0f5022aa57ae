"""Original-format (pesser/pytorch_diffusion) key names to and from diffusers names."""

import pytest
import torch

from app.nets.checkpoint import load_checkpoint, unet_from_state_dict
from app.nets.config import SchedulerConfig
from app.nets.convert import (
    convert_original_checkpoint,
    convert_original_state_dict,
    original_key,
    to_original_state_dict,
)
from app.nets.errors import CheckpointError
from app.nets.presets import Preset


@pytest.fixture
def unet(random_unet):
    return random_unet(seed=3)


@pytest.fixture
def original(unet, small_config):
    return to_original_state_dict(unet.state_dict(), small_config)


def test_original_names(original, small_config):
    # SMALL: 3 levels (28, 14, 7) of 32, 64, 64 channels, attention at 14 and 7, one ResBlock per level.
    assert original["temb.dense.0.weight"].shape == (128, 32)
    assert original["temb.dense.1.weight"].shape == (128, 128)
    assert "down.0.block.0.conv1.weight" in original
    assert "down.1.block.0.nin_shortcut.weight" in original  # 32 -> 64
    assert "down.0.block.0.nin_shortcut.weight" not in original  # 32 -> 32
    assert "down.1.attn.0.q.weight" in original and "down.0.attn.0.q.weight" not in original
    assert "down.1.downsample.conv.weight" in original and "down.2.downsample.conv.weight" not in original
    # up.0 is the highest resolution: its last block takes 32 (h) + 32 (conv_in's skip) to 32 channels.
    assert original["up.0.block.1.nin_shortcut.weight"].shape == (32, 64, 1, 1)
    assert original["up.2.block.0.conv1.weight"].shape == (64, 128, 3, 3)
    assert "up.2.attn.1.proj_out.bias" in original and "up.0.attn.0.q.bias" not in original
    assert "up.1.upsample.conv.weight" in original and "up.0.upsample.conv.weight" not in original
    assert original["mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert {
        "mid.block_1.temb_proj.weight",
        "mid.block_2.norm2.bias",
        "mid.attn_1.norm.weight",
    } <= original.keys()
    assert {"norm_out.weight", "conv_out.bias", "conv_in.weight"} <= original.keys()
    assert original_key("up_blocks.0.upsamplers.0.conv.weight", 3) == "up.2.upsample.conv.weight"


# The original (pesser/pytorch_diffusion) name of each diffusers parameter, written out by hand: tensors
# of equal shape (q, k, v and proj_out; block_1 and block_2; up levels of equal width) can only be told
# apart by their values, which a round trip through the two converters would not check.
ORIGINAL_OF = {
    "mid_block.attentions.0.to_q.weight": "mid.attn_1.q.weight",
    "mid_block.attentions.0.to_k.weight": "mid.attn_1.k.weight",
    "mid_block.attentions.0.to_v.weight": "mid.attn_1.v.weight",
    "mid_block.attentions.0.to_out.0.weight": "mid.attn_1.proj_out.weight",
    "mid_block.attentions.0.to_q.bias": "mid.attn_1.q.bias",
    "mid_block.attentions.0.to_k.bias": "mid.attn_1.k.bias",
    "mid_block.attentions.0.to_v.bias": "mid.attn_1.v.bias",
    "mid_block.attentions.0.group_norm.weight": "mid.attn_1.norm.weight",
    "mid_block.resnets.0.conv1.weight": "mid.block_1.conv1.weight",
    "mid_block.resnets.1.conv1.weight": "mid.block_2.conv1.weight",
    "mid_block.resnets.0.norm1.weight": "mid.block_1.norm1.weight",
    "mid_block.resnets.0.norm2.weight": "mid.block_1.norm2.weight",
    "mid_block.resnets.0.time_emb_proj.weight": "mid.block_1.temb_proj.weight",
    "down_blocks.1.attentions.0.to_k.weight": "down.1.attn.0.k.weight",
    "down_blocks.2.attentions.0.to_v.weight": "down.2.attn.0.v.weight",
    "down_blocks.1.resnets.0.conv_shortcut.weight": "down.1.block.0.nin_shortcut.weight",
    "down_blocks.1.downsamplers.0.conv.weight": "down.1.downsample.conv.weight",
    "up_blocks.0.resnets.0.conv1.weight": "up.2.block.0.conv1.weight",
    "up_blocks.0.resnets.1.conv2.weight": "up.2.block.1.conv2.weight",
    "up_blocks.1.resnets.0.conv2.weight": "up.1.block.0.conv2.weight",
    "up_blocks.0.attentions.1.to_q.weight": "up.2.attn.1.q.weight",
    "up_blocks.1.attentions.0.to_out.0.weight": "up.1.attn.0.proj_out.weight",
    "up_blocks.0.upsamplers.0.conv.weight": "up.2.upsample.conv.weight",
    "up_blocks.1.upsamplers.0.conv.weight": "up.1.upsample.conv.weight",
    "time_embedding.linear_1.weight": "temb.dense.0.weight",
    "time_embedding.linear_2.weight": "temb.dense.1.weight",
    "conv_norm_out.weight": "norm_out.weight",
}


def test_each_tensor_lands_under_its_original_name(unet, original, small_config):
    state = unet.state_dict()
    for new, old in ORIGINAL_OF.items():
        want = state[new][:, :, None, None] if ".to_" in new and new.endswith("weight") else state[new]
        assert torch.equal(original[old], want), f"{new} is not {old}"
    converted = convert_original_state_dict(original, small_config)
    for new, old in ORIGINAL_OF.items():
        assert torch.equal(converted[new], state[new]), f"{old} is not read as {new}"


def test_round_trip_is_exact(unet, original, small_config):
    back = convert_original_state_dict(original, small_config)
    state = unet.state_dict()
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_converted_weights_give_identical_outputs(unet, original, small_config):
    converted = unet_from_state_dict(
        small_config, convert_original_state_dict(original, small_config), source="-"
    )
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([1, 999])
    with torch.no_grad():
        assert torch.equal(converted(x, t), unet(x, t))


def test_unknown_missing_and_misshapen_original_keys(original, small_config):
    unknown = original | {"down.0.block.0.conv_shortcut.weight": torch.zeros(32, 32, 3, 3)}
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: down\.0\.block\.0\.conv_shortcut\.weight"):
        convert_original_state_dict(unknown, small_config)
    missing = {k: v for k, v in original.items() if k != "mid.attn_1.proj_out.bias"}
    with pytest.raises(CheckpointError, match=r"1 missing keys: mid\.attn_1\.proj_out\.bias"):
        convert_original_state_dict(missing, small_config)
    linear_q = original | {"mid.attn_1.q.weight": torch.zeros(64, 64)}
    with pytest.raises(
        CheckpointError, match=r"mid\.attn_1\.q\.weight expected \(64, 64, 1, 1\) found \(64, 64\)"
    ):
        convert_original_state_dict(linear_q, small_config)


def test_convert_original_checkpoint_writes_a_loadable_folder(tmp_path, unet, original, small_config):
    preset = Preset("tiny", small_config, SchedulerConfig(variance_type="fixed_small"), "-", "test preset")
    torch.save(original, tmp_path / "model-790000.ckpt")
    out = convert_original_checkpoint(tmp_path / "model-790000.ckpt", tmp_path / "converted", preset=preset)
    ckpt = load_checkpoint(out)
    assert ckpt.scheduler == preset.scheduler and ckpt.unet.config == small_config
    state = unet.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in ckpt.unet.state_dict().items())
    with pytest.raises(CheckpointError, match="unknown preset 'nope'; known: cifar10, celebahq"):
        convert_original_checkpoint(tmp_path / "model-790000.ckpt", tmp_path / "x", preset="nope")
    with pytest.raises(
        CheckpointError, match=r"model-790000\.ckpt: the original-format weights do not match"
    ):
        convert_original_checkpoint(tmp_path / "model-790000.ckpt", tmp_path / "x", preset="cifar10")


def test_diffusers_named_weights_need_no_converting(tmp_path, unet, small_config):
    preset = Preset("tiny", small_config, SchedulerConfig(variance_type="fixed_small"), "-", "test preset")
    weights = tmp_path / "ema.pt"
    torch.save(unet.state_dict(), weights)
    with pytest.raises(CheckpointError) as e:
        convert_original_checkpoint(weights, tmp_path / "out", preset=preset)
    assert str(e.value) == (
        f"{weights}: these weights have diffusers' key names already (time_embedding.linear_1, "
        f"down_blocks…) and need no converting; load them as PRESET:WEIGHTS, e.g. --model tiny:{weights}"
    )
    assert not (tmp_path / "out").exists()


def test_original_weights_saved_through_data_parallel_convert(tmp_path, unet, original, small_config):
    preset = Preset("tiny", small_config, SchedulerConfig(variance_type="fixed_small"), "-", "test preset")
    torch.save({f"module.{k}": v for k, v in original.items()}, tmp_path / "model-790000.ckpt")
    out = convert_original_checkpoint(tmp_path / "model-790000.ckpt", tmp_path / "converted", preset=preset)
    state = unet.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in load_checkpoint(out).unet.state_dict().items())
