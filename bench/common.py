"""Shared helpers of the benchmarks: timing, machine description, tables and JSON results."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from app.engine import threads
from app.engine.fastpath import FastPath

T = TypeVar("T")

# Where results go: $BENCH_RESULTS (bench/gpu.sh points it at the device's $OUT), else bench/results.
RESULTS = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict[str, str | int]:
    """What ran the benchmark, for the results file."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": threads.for_engines(),
        "gpu": gpu or "none",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads. On a shared, busy machine one thread is far steadier than two that wait
    for each other at every OpenMP barrier while another process holds a core."""
    if threads:
        torch.set_num_threads(threads)


def like_an_engine(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` in a thread of its own that takes the intra-op threads as an engine thread does
    (app.engine.threads): in a confined process, code raced against the engine (diffusers) gets the
    same threads. Run it while no engine runs: two teams at once slow both (libgomp's throttling)."""
    with ThreadPoolExecutor(1, thread_name_prefix="like-an-engine", initializer=threads.take) as thread:
        return thread.submit(fn, *args).result()  # the thread, and its team, end with the block


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], *, device: torch.device, repeat: int = 5, warmup: int = 2) -> float:
    """Median seconds of `repeat` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(
    fns: dict[str, Callable[[], object]], *, device: torch.device, repeat: int = 3, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each function, timed in rounds that call every function once (in a rotating
    order), so that a burst of load from another process hits all of them alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    line = " | ".join(c.ljust(widths[c]) for c in columns)
    rule = "-|-".join("-" * widths[c] for c in columns)
    body = "\n".join(" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows)
    return f"{line}\n{rule}\n{body}"


def save(name: str, rows: list[dict], **extra) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "rows": rows,
        **extra,
    }
    path.write_text(json.dumps(payload, indent=2))
    return path


FAST_FLAGS = {"channels_last", "bf16", "fp16", "compile", "graphs"}
H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's H200 SXM datasheet: 1979 TFLOP/s bf16 with sparsity, half dense


def fast_path(spec: str, *, batch: int) -> FastPath:
    """FastPath from "channels_last,bf16,compile,graphs"; compile/graphs use a single bucket, the batch."""
    flags = {f.strip() for f in spec.split(",") if f.strip()}
    if unknown := flags - FAST_FLAGS:
        raise SystemExit(f"unknown --fast flags {sorted(unknown)}; known: {sorted(FAST_FLAGS)}")
    dtype = "bfloat16" if "bf16" in flags else "float16" if "fp16" in flags else "float32"
    return FastPath(
        channels_last="channels_last" in flags,
        dtype=dtype,
        compile="compile" in flags,
        cuda_graphs="graphs" in flags,
        buckets=(batch,),
    )


def conv_tflop_s(dtype: torch.dtype, *, device: torch.device, channels_last: bool = False) -> float:
    """TFLOP/s of one 3×3 convolution in `dtype` (64 → 64 channels at 32×32, batch 16 on a CPU; 256 channels,
    batch 64 on a GPU), the operation that makes most of a U-Net's FLOPs: measured in the same process, a
    yardstick for the whole network's FLOP/s through the same kernels (oneDNN on a CPU, cuDNN on a GPU)."""
    batch, channels = (64, 256) if device.type == "cuda" else (16, 64)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(device, dtype)
    x = torch.randn(batch, channels, 32, 32, device=device, dtype=dtype)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        # the best of five medians: a rate this device reaches, not one another process held it to
        seconds = min(timeit(lambda: conv(x), device=device, repeat=3, warmup=1) for _ in range(5))
    return 2 * batch * channels**2 * 9 * 32 * 32 / seconds / 1e12


def flops_per_image(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """FLOPs of one forward of one image (PyTorch's FLOP counter: 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x[:1], t[:1])
    return counter.get_total_flops()
