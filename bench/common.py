"""Shared helpers of the benchmarks: timing, machine description, tables and JSON results."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import TypeVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from app.engine import threads
from app.engine.fastpath import FastPath

T = TypeVar("T")

# Where results go: $BENCH_RESULTS (bench/gpu.sh points it at the device's $OUT), else bench/results.
RESULTS = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict[str, object]:
    """What ran the benchmark, for the results file: the command, the code's commit, the CPU (its model
    and the vector instructions torch uses: AVX2 or AVX-512 swing CPU figures several-fold), the GPU and
    its software, and whether float32 matmuls and convolutions on it may use TF32."""
    info: dict[str, object] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": _commit(),
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads.for_engines(),
        "gpu": "none",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info |= {
            "gpu": torch.cuda.get_device_name(0),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        }
    return info


def _commit() -> str:
    try:
        run = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"  # no git (the device machine's copy may have none)
    return run.stdout.strip()


def _cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


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


def convolutions(
    model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor
) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """Every convolution one forward of `model` makes, with the input it got (copied): to time them alone."""
    calls: list[tuple[torch.nn.Module, torch.Tensor]] = []

    def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        calls.append((module, inputs[0].detach().clone()))

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [m.register_forward_hook(record) for m in convs]
    try:
        with torch.inference_mode():
            model(x, t)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def convolutions_alone(
    calls: list[tuple[torch.nn.Module, torch.Tensor]], *, channels_last: bool = False, dtype: str = "float32"
) -> Callable[[], None]:
    """A function that runs `calls` (from `convolutions`) one after the other, as a forward would: in
    channels_last (copies of the modules and inputs) and under the autocast `dtype` of a fast path. The
    time of a forward's convolutions alone, nearly all of its FLOPs: what a forward would take if nothing
    else in it cost anything, so diffusers' time over it bounds the ratio any implementation could reach
    with the same convolution kernels."""
    if channels_last:
        calls = [
            (
                copy.deepcopy(m).to(memory_format=torch.channels_last),
                x.contiguous(memory_format=torch.channels_last),
            )
            for m, x in calls
        ]
    device = calls[0][1].device
    autocast = torch.autocast(device.type, getattr(torch, dtype)) if dtype != "float32" else nullcontext()

    def run() -> None:
        with torch.inference_mode(), autocast:
            for module, x in calls:
                module(x)

    return run


def flops_per_image(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """FLOPs of one forward of one image (PyTorch's FLOP counter: 2 per multiply-add). Attention runs as
    its plain maths while counting: the counter knows no formula for the CPU's fused attention kernel,
    and would leave QKᵀ and the weighted sum out."""
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x[:1], t[:1])
    return counter.get_total_flops()
