"""bench.common: diffusers raced against the engine runs in a thread of its own (like_an_engine); a
forward's convolutions timed alone; FLOPs with attention; what a results file says of its run."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import convolutions, convolutions_alone, flops_per_image, like_an_engine, machine


def test_like_an_engine_returns_what_fn_returns_from_another_thread():
    def add(a, b):
        return a + b, threading.current_thread().name

    assert like_an_engine(add, 2, 3) == (5, "like-an-engine_0")


def test_like_an_engine_raises_what_fn_raised():
    def broken():
        raise ValueError("out of memory")

    with pytest.raises(ValueError, match="out of memory"):
        like_an_engine(broken)


def test_the_p95_latency_is_the_nearest_rank():
    from bench.serving import Load

    load = Load(window=20.0, latencies=[float(k) for k in range(1, 21)])  # 1 … 20 s
    assert load.row(concurrency=1)["p95_s"] == 19.0  # the 19th of 20, not the largest


def tiny_unet():
    from tests.tiny import tiny_checkpoint

    unet = tiny_checkpoint(timesteps=10).unet.eval()
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    return unet, x, torch.tensor([3, 7])


def test_a_forwards_convolutions_are_recorded_with_their_inputs_and_rerun_alone():
    unet, x, t = tiny_unet()
    calls = convolutions(unet, x, t)
    assert len(calls) == sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules())  # each runs once
    assert calls[0][1].shape == x.shape and torch.equal(calls[0][1], x)  # conv_in got the image itself
    ran: list[torch.nn.Module] = []
    hook = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: ran.append(m))
    try:
        convolutions_alone(calls)()
        convolutions_alone(calls, channels_last=True, dtype="bfloat16")()  # copies, in the fast path's form
    finally:
        hook.remove()
    assert ran[: len(calls)] == [m for m, _ in calls] and len(ran) == 2 * len(calls)
    # Convolutions are nearly all of the FLOPs: what makes "bound" a bound on a whole forward.
    with FlopCounterMode(display=False) as counter:
        convolutions_alone(calls)()
    assert counter.get_total_flops() > 0.9 * flops_per_image(unet, x, t) * len(x)


def test_flops_include_attention():
    unet, x, t = tiny_unet()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x[:1], t[:1])  # the CPU's fused attention kernel: no formula, not counted
    side = unet.config.sample_size // 2  # tiny's attention resolution
    channels = unet.config.block_out_channels[-1]
    attention = 2 * (2 * side**2 * side**2 * channels)  # QKᵀ and the weighted sum, per attention layer
    assert flops_per_image(unet, x, t) - counter.get_total_flops() >= attention


def test_results_say_what_ran_them():
    info = machine()
    assert info["command"] and info["commit"] and info["cpu"]
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
