"""The library entry point against diffusers' pipelines on the same weights."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from app.nets import load_checkpoint
from app.sampling import generate


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A random-weight diffusers UNet2DModel saved in the hub layout, with its DDPM scheduler config."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_eps=1e-6,
        freq_shift=1,
        flip_sin_to_cos=False,
        downsample_padding=0,
    ).eval()
    folder = tmp_path_factory.mktemp("pretrained")
    unet.save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large").save_pretrained(folder)
    return folder, unet


@pytest.mark.parametrize("steps", [50, 1000])
def test_ddim_matches_diffusers_ddim_scheduler(pretrained, steps):
    folder, theirs = pretrained
    ckpt = load_checkpoint(folder)
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = generate(
        ckpt, n=2, steps=steps, sampler="ddim", eta=0.0, clip_denoised=False, latents=latents
    ).images

    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(steps)
    x = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(theirs(x, t).sample, t, x, eta=0.0).prev_sample
    # an untrained net drifts far from [-1, 1] without clipping, so compare relative to the scale
    assert (ours - x).abs().max() / x.abs().max() <= 1e-5


def test_images_depend_only_on_seed_and_index(pretrained):
    ckpt = load_checkpoint(pretrained[0])
    four = generate(ckpt, n=4, steps=5, seed=3).images
    two = generate(ckpt, n=2, steps=5, seed=3).images
    # equal up to float rounding: with two threads the kernels' sums can split differently by batch size
    torch.testing.assert_close(four[:2], two, atol=1e-4, rtol=0)
    assert not torch.allclose(four[0], four[1])
    assert generate(ckpt, n=1, steps=5).seed != generate(ckpt, n=1, steps=5).seed  # random when not given


def test_callback_sees_every_step_and_clipped_x0(pretrained):
    ckpt = load_checkpoint(pretrained[0])
    seen = []
    generate(
        ckpt,
        n=1,
        steps=7,
        sampler="ddpm",
        seed=0,
        callback=lambda i, t, xt, x0: seen.append((i, int(t[0]), float(x0.abs().max()))),
    )
    assert [s[0] for s in seen] == list(range(7))
    assert seen[0][1] == 999 and all(m <= 1.0 for *_, m in seen)


def test_bad_arguments_are_value_errors(pretrained):
    ckpt = load_checkpoint(pretrained[0])
    with pytest.raises(ValueError, match="sampler"):
        generate(ckpt, n=1, sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        generate(ckpt, n=1, steps=1001)
    with pytest.raises(ValueError, match="latents must have shape"):
        generate(ckpt, n=2, latents=torch.zeros(1, 3, 8, 8))
    assert np.isfinite(generate(ckpt, n=1, steps=1, seed=0).images.numpy()).all()
