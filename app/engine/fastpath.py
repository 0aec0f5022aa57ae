"""ε_θ(x_t, t) as the engine calls it: the plain U-Net, or the same maths through the fast paths.

- channels_last: NHWC activations, what cuDNN's and oneDNN's fastest convolutions take (the U-Net's
  attention reads NHWC as a free view).
- dtype "bfloat16" / "float16": autocast of the U-Net (convolutions and linear layers in 16 bits,
  normalisation, softmax and attention in float32); ε comes back as float32, so the update, the
  schedule and the RNG stay in float32/float64. float16 is CUDA-only.
- compile: `torch.compile` of the forward with static shapes; batches are padded to a few sizes
  (`buckets`), each compiled by `warm_up` at start-up, never while a request waits.
- cuda_graphs: one CUDA graph per bucket, captured by `warm_up`; a step then copies its rows into the
  graph's static input, replays it and copies ε out — one launch instead of hundreds.

Rows of the U-Net never interact (group norm and attention are per image), so padding rows do not
change the others; batches wider than the largest bucket run the plain module.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class FastPath:
    """Which fast paths the engine's forward uses; the default is the plain float32 module."""

    channels_last: bool = False
    dtype: str = "float32"
    compile: bool = False
    cuda_graphs: bool = False
    buckets: tuple[int, ...] = ()  # batch sizes to compile/capture; () = powers of two up to max_batch

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if any(b < 1 for b in self.buckets):
            raise ValueError(f"batch buckets must be positive, got {self.buckets}")

    @property
    def padded(self) -> bool:
        """Whether batches are padded to bucket sizes (static shapes for compile and graphs)."""
        return self.compile or self.cuda_graphs

    def check(self, device: torch.device) -> None:
        """Refuse combinations the device cannot run, at start-up rather than at the first step."""
        if device.type != "cuda" and self.cuda_graphs:
            raise ValueError(f"cuda_graphs needs a CUDA device, the engine runs on {device}")
        if device.type != "cuda" and self.dtype == "float16":
            raise ValueError(f"dtype float16 needs a CUDA device, the engine runs on {device}")
        if device.type == "cpu" and self.dtype == "bfloat16" and not cpu_has_native_bf16():
            log.warning(
                "dtype bfloat16 on a CPU without native bfloat16 (no AVX-512 BF16 or AMX): oneDNN "
                "emulates it, 6-19x slower than float32 on the 28x28 model on an AVX2-only EPYC "
                "(docs/benchmarks.md); DDPM_DTYPE=float32 is faster here"
            )


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX-512 BF16 or AMX). Unknown counts as yes."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private probe: absent from some builds
        return True


@functools.cache
def _strides(shape: tuple[int, ...], memory_format: torch.memory_format) -> tuple[int, ...]:
    return torch.empty(shape, device="meta", memory_format=memory_format).stride()


def buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes compiled and captured: powers of two below max_batch, and max_batch itself."""
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


class Forward:
    """Callable (x (B, C, H, W) float32, t (B,) long) → ε float32, through the configured fast paths;
    it runs in inference mode.

    Converts `unet` in place to channels_last when asked: the engine owns its model.
    """

    def __init__(self, unet: nn.Module, fast: FastPath, *, device: torch.device, max_batch: int) -> None:
        fast.check(device)
        self.unet, self.fast, self.device = unet.eval(), fast, device
        self.buckets = (tuple(sorted(set(fast.buckets))) or buckets(max_batch)) if fast.padded else ()
        self.memory_format = torch.channels_last if fast.channels_last else torch.contiguous_format
        if fast.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self._eager = self._autocast(self.unet)
        self._fn = self._eager
        if fast.compile:
            _allow_recompiles(len(self.buckets))
            self._fn = torch.compile(self._eager, dynamic=False)
        self._graphs: dict[int, _Graph] = {}
        self._pool: tuple[int, int] | None = None  # one memory pool for every graph: they never overlap

    def _autocast(self, unet: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
        dtype = DTYPES[self.fast.dtype]
        if dtype is torch.float32:
            return unet
        device_type = self.device.type

        def forward(x: Tensor, t: Tensor) -> Tensor:
            with torch.autocast(device_type, dtype=dtype):
                return unet(x, t).float()

        return forward

    def bucket(self, rows: int) -> int:
        """The batch size that `rows` rows run at: their bucket when batches are padded, else `rows`."""
        return next((b for b in self.buckets if b >= rows), rows)

    @torch.inference_mode()
    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        rows = x.shape[0]
        bucket = self.bucket(rows)
        if bucket not in self.buckets:  # plain path: no padding, or wider than every bucket
            return self._eager(self._layout(x), t)
        if self.fast.cuda_graphs:
            return self._graph(bucket, tuple(x.shape[1:])).run(x, t)
        # Dynamo guards on inference-ness: inputs made outside inference mode would compile again.
        return self._layout(self._fn(self._layout(_pad(x, bucket)), _pad(t, bucket)))[:rows]

    def _layout(self, x: Tensor) -> Tensor:
        return self._canonical(x.contiguous(memory_format=self.memory_format))

    def _canonical(self, x: Tensor) -> Tensor:
        """`x` (laid out in the forward's memory format) with the strides a new tensor of that format has.

        Where a dimension has size 1 (one channel: the MNIST model) its stride addresses nothing, and
        layouts that agree everywhere else can differ there: zeros() made NCHW count as channels_last
        with a channel stride of H·W, a buffer made channels_last has 1. Dynamo guards on every stride,
        so without this a bucket compiled at start-up compiled again at its first request (about 40 s
        on a CPU). Same memory, no copy."""
        if x.ndim != 4 or not x.is_contiguous(memory_format=self.memory_format):
            return x  # another layout: its strides are not this format's to replace
        strides = _strides(tuple(x.shape), self.memory_format)
        return x if x.stride() == strides else x.as_strided(x.shape, strides, x.storage_offset())

    def _graph(self, bucket: int, shape: tuple[int, ...]) -> _Graph:
        graph = self._graphs.get(bucket)
        if graph is None:  # captured by warm_up, or here on first use when warm_up was skipped
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = _Graph(self._fn, bucket, shape, self.memory_format, self.device, self._pool)
            self._graphs[bucket] = graph
        return graph

    @torch.inference_mode()
    def warm_up(self, shape: tuple[int, int, int]) -> None:
        """Compile (and capture) every bucket now, largest first, so that no request pays for it."""
        for bucket in sorted(self.buckets, reverse=True):
            x = torch.zeros(bucket, *shape, device=self.device)
            t = torch.zeros(bucket, dtype=torch.long, device=self.device)
            if self.fast.cuda_graphs:
                self._graph(bucket, shape)
            else:
                self(x, t)
            log.info("fast path warmed up for batch %d", bucket)


_compiled_shapes = 0  # buckets compiled so far, every model together


def _allow_recompiles(shapes: int) -> None:
    """Let dynamo keep one graph per bucket and per model. Its limit (8 by default) counts the graphs of one
    code object, UNet.forward, whatever the instance, so every engine that compiles adds its buckets."""
    global _compiled_shapes
    _compiled_shapes += shapes
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), _compiled_shapes + 8))


def _pad(v: Tensor, rows: int) -> Tensor:
    """v with zero rows appended up to `rows`, as an inference tensor."""
    if v.shape[0] == rows and v.is_inference():
        return v
    return torch.cat([v, v.new_zeros((rows - v.shape[0], *v.shape[1:]))])


class _Graph:
    """One CUDA graph of `fn` for a batch of `rows`: static input and output buffers, replayed per step."""

    WARMUP_CALLS = 3  # on a side stream before capture, as torch.cuda.graphs asks (cuDNN/cuBLAS set-up)

    def __init__(
        self,
        fn: Callable[[Tensor, Tensor], Tensor],
        rows: int,
        shape: tuple[int, ...],
        memory_format: torch.memory_format,
        device: torch.device,
        pool: tuple[int, int],
    ) -> None:
        self.rows = rows
        self.x = torch.zeros(rows, *shape, device=device).contiguous(memory_format=memory_format)
        self.t = torch.zeros(rows, dtype=torch.long, device=device)
        with torch.cuda.device(device), torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP_CALLS):
                    fn(self.x, self.t)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.eps = fn(self.x, self.t)

    def run(self, x: Tensor, t: Tensor) -> Tensor:
        n = x.shape[0]
        self.x[:n].copy_(x)
        self.t[:n].copy_(t)
        if n < self.rows:  # padding rows: zeros, whatever an earlier, wider step left there
            self.x[n:].zero_()
            self.t[n:].zero_()
        self.graph.replay()
        return self.eps[:n].clone()  # the next replay overwrites the static output
