"""The U-Net against diffusers' UNet2DModel (the oracle) on the same random weights."""

import pytest
import torch
from diffusers import UNet2DModel

from app.nets.unet import UNet, UNetConfig, timestep_embedding

TOLERANCE = 1e-5  # max|ours − theirs| / max|theirs|

CUSTOM = UNetConfig(
    sample_size=20,  # 20 -> 10 -> 5
    in_channels=2,
    out_channels=1,
    center_input_sample=True,
    time_embedding_dim=40,
    freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
    block_out_channels=(16, 32, 48),
    layers_per_block=1,
    mid_block_scale_factor=2.0,
    downsample_padding=1,
    dropout=0.2,
    attention_head_dim=8,  # 2, 4 and 6 heads
    norm_num_groups=8,
    attn_norm_num_groups=4,
    norm_eps=1e-5,
)


def twins(config, randomize, seed=0):
    """diffusers' UNet2DModel and ours holding the same random weights."""
    torch.manual_seed(seed)
    theirs = randomize(UNet2DModel.from_config(config.to_dict()), seed)
    ours = UNet(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def test_cifar10_architecture_equals_diffusers(randomize, rel_err):
    ours, theirs = twins(UNetConfig(), randomize)
    assert ours.num_parameters() == 35_746_307
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 917])
    with torch.no_grad():
        assert rel_err(ours(x, t), theirs(x, t).sample) <= TOLERANCE


@pytest.mark.parametrize(
    ("config", "t"),
    [
        pytest.param("small", torch.tensor([7, 640], dtype=torch.int32), id="mnist-28x28-attn-14-7-mid"),
        pytest.param(CUSTOM, torch.tensor([3.5, 811.25], dtype=torch.float64), id="multihead-20x20-pad1"),
    ],
)
def test_small_architectures_equal_diffusers(config, t, small_config, randomize, rel_err):
    config = small_config if config == "small" else config
    ours, theirs = twins(config, randomize, seed=2)
    assert ours.training is False and config.dropout > 0
    size = config.sample_size
    x = torch.randn(2, config.in_channels, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = ours(x, t)
        assert out.shape == (2, config.out_channels, size, size)
        assert rel_err(out, theirs(x, t).sample) <= TOLERANCE


def test_one_t_per_row_and_scalar_broadcast(random_unet):
    unet = random_unet()
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        batched = unet(x, torch.tensor([5, 900, 5]))
        alone = unet(x[1:2], 900)
        scalar = unet(x, torch.tensor(5.0))
        as_float = unet(x, torch.tensor([5.0, 900.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(batched[1:2], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[[0, 2]], scalar[[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, as_float, rtol=0, atol=0)
    assert (batched[1] - scalar[1]).abs().max() > 1e-3  # t changes ε


def test_channels_last_gives_the_same_output(random_unet):
    unet = random_unet()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        expected = unet(x, t)
        unet = unet.to(memory_format=torch.channels_last)
        got = unet(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_timestep_embedding_is_the_papers_sinusoid():
    # Original code: cat[sin, cos] of t·exp(−ln(10⁴)·i/(half − 1)), i = 0..half−1.
    emb = timestep_embedding(torch.tensor([0, 10]), 8, flip_sin_to_cos=False, freq_shift=1)
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])
    torch.testing.assert_close(emb[1], torch.cat([torch.sin(10 * freqs), torch.cos(10 * freqs)]))
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_training_mode_applies_dropout(random_unet):
    unet = random_unet().train()
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        assert not torch.equal(unet(x, 3), unet(x, 3))
        assert torch.equal(unet.eval()(x, 3), unet(x, 3))
