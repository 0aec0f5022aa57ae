"""Every fast path of the engine's forward against the plain float32 module, on the CPU.

Tolerances: channels_last and compile reorder float32 sums (≤ 1e-5 on ε of order 1); bfloat16
autocast keeps 8 mantissa bits per convolution (≤ 5e-2 on ε, the stated budget). CUDA graphs and
float16 are exercised on a GPU by bench/gpu.sh and by the CUDA-only test below.
"""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from app.engine import fastpath
from app.engine.fastpath import FastPath, Forward, buckets
from tests.tiny import tiny_unet

CPU = torch.device("cpu")
FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (5,), generator=gen)
    return x, t


@pytest.fixture(scope="module")
def plain(batch):
    with torch.inference_mode():
        return tiny_unet()(*batch)


def _forward(fast: FastPath, max_batch: int = 8) -> Forward:
    return Forward(tiny_unet(), fast, device=CPU, max_batch=max_batch)


def test_buckets_are_powers_of_two_and_max_batch():
    assert buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert buckets(1) == (1,)


def test_a_fast_path_with_a_bad_dtype_or_bucket_is_refused():
    with pytest.raises(ValueError, match="batch buckets must be positive, got"):
        FastPath(compile=True, buckets=(4, 0))
    with pytest.raises(ValueError, match="dtype must be one of"):
        FastPath(dtype="float64")


def test_default_is_the_plain_module(batch, plain):
    f = _forward(FastPath())
    assert f.buckets == ()
    with torch.inference_mode():
        assert torch.equal(f(*batch), plain)


def test_channels_last_equals_plain(batch, plain):
    f = _forward(FastPath(channels_last=True))
    assert f.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(f(*batch), plain, **FP32)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bfloat16_autocast_stays_within_its_budget(batch, plain, channels_last):
    f = _forward(FastPath(dtype="bfloat16", channels_last=channels_last))
    with torch.inference_mode():
        eps = f(*batch)
    assert eps.dtype == torch.float32
    assert (eps - plain).abs().max() <= 5e-2
    assert (eps - plain).abs().max() > 0  # it did run in 16 bits


def test_rows_never_interact_so_padding_changes_nothing(batch, plain):
    """What bucket padding relies on: ε of a row is the same with zero rows appended."""
    x, t = batch
    with torch.inference_mode():
        padded = tiny_unet()(torch.cat([x, torch.zeros(3, *x.shape[1:])]), torch.cat([t, t.new_zeros(3)]))
    torch.testing.assert_close(padded[:5], plain, **FP32)


@pytest.mark.parametrize(
    "fast", [FastPath(cuda_graphs=True), FastPath(dtype="float16")], ids=["cuda_graphs", "float16"]
)
def test_cuda_only_paths_are_refused_on_the_cpu(fast):
    with pytest.raises(ValueError, match="CUDA"):
        _forward(fast)


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_on_a_cpu_without_native_support_warns(native, monkeypatch, caplog):
    monkeypatch.setattr(fastpath, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="app.engine.fastpath"):
        FastPath(dtype="bfloat16").check(CPU)
        FastPath().check(CPU)
    assert ("without native bfloat16" in caplog.text) is not native


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype"):
        FastPath(dtype="int8")


@pytest.mark.slow
def test_compiled_forward_pads_to_buckets_and_equals_plain(batch, plain):
    """Warm-up compiles the tiny model for buckets 1, 2, 4 (about 2 minutes on two busy cores); batches
    of 1..4 then reuse those graphs without compiling again, and 5 rows run the eager module."""
    x, t = batch
    f = _forward(FastPath(compile=True, channels_last=True), max_batch=4)
    assert f.buckets == (1, 2, 4)
    f.warm_up((1, 8, 8))
    compiled = counters["stats"]["unique_graphs"]
    # One channel: NCHW input and a channels_last buffer (as the engine's) differ only in the stride of
    # the size-1 channel dimension, which dynamo guards on too.
    with torch.inference_mode():  # as the engine's buffers are: _pad would copy another tensor
        x_cl = torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
    assert x_cl.stride() != x.contiguous(memory_format=torch.channels_last).stride()
    with torch.inference_mode():
        for rows in (1, 3, 4, 5):
            torch.testing.assert_close(f(x[:rows], t[:rows]), plain[:rows], **FP32)
            torch.testing.assert_close(f(x_cl[:rows], t[:rows]), plain[:rows], **FP32)
    assert counters["stats"]["unique_graphs"] == compiled  # nothing compiled after warm_up


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_equal_the_eager_cuda_forward(batch, dtype):
    x, t = (v.cuda() for v in batch)
    fast = FastPath(channels_last=True, dtype=dtype, cuda_graphs=True)
    f = Forward(tiny_unet().cuda(), fast, device=torch.device("cuda"), max_batch=4)
    eager = Forward(tiny_unet().cuda(), FastPath(dtype=dtype), device=torch.device("cuda"), max_batch=4)
    f.warm_up((1, 8, 8))
    tol = FP32 if dtype == "float32" else dict(rtol=0, atol=5e-2)
    with torch.inference_mode():
        for rows in (1, 3, 4, 5):
            torch.testing.assert_close(f(x[:rows], t[:rows]), eager(x[:rows], t[:rows]), **tol)
