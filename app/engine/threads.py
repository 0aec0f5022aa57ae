"""CPU threads: the engine threads compute in parallel, every other thread of the process in one thread.

PyTorch's CPU build runs its intra-op parallelism on OpenMP, and libgomp gives every thread that opens a
parallel region a team of worker threads of its own, kept for the life of that thread. Once a process
holds more of them than it has CPUs, libgomp stops spinning between regions in every team and sleeps on
a futex instead (its "throttled" spin count); a U-Net step opens hundreds of short regions and then waits
for a wake-up at each. On two cores, a forward in the engine thread took 26.7 ms instead of 11.5 (bf16,
batch 1) and 73 instead of 50 (batch 16) once the main thread had computed in parallel, as loading a
checkpoint does (docs/benchmarks.md, session 8).

So a process that serves (`ddpm-serve` embedded, `ddpm-worker`) calls `confine()` before any torch work:
torch's count becomes 1, and each CPU engine's thread calls `take()` first, which gives that thread alone
the count the process had (`OMP_NUM_THREADS`, else torch's default, the cores), split between the CPU
engines of the process (two teams of n on n cores would throttle both, even while one model is idle).
Other threads take torch's count, 1, at their first ATen operation; oneDNN convolutions and MKL products
skip that and take libgomp's default (the cores), so the threads the process starts for torch work call
`follow()` first (the job runner's encoders, the worker's writers). Without `confine()` (the CLI, tests,
library use) `take()` changes nothing.
"""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger(__name__)

_engine_threads: int | None = None  # the count engine threads share; None until confine()


def confine() -> int:
    """Make torch single-threaded in every thread but the engines'; returns the engines' count.

    Call it first, before any torch computation: a thread that has already computed in parallel keeps its
    team (and so the slowdown) whatever is set later.
    """
    global _engine_threads
    if _engine_threads is None:
        _engine_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        follow()
        log.info("intra-op threads: %d for the engine threads, 1 elsewhere", _engine_threads)
    return _engine_threads


def for_engines() -> int:
    """The intra-op threads the engine threads share."""
    return torch.get_num_threads() if _engine_threads is None else _engine_threads


def follow() -> None:
    """Fix the calling thread's count at torch's now (1 once confined), as its first ATen operation would;
    a thread whose first computation is a convolution or a matrix product would take libgomp's default."""
    torch.get_num_threads()


def take(share: int = 1) -> None:
    """In a CPU engine's thread, before its first computation: give this thread the process's threads,
    divided by `share` (the process's CPU engines), at least one.

    `torch.set_num_threads` sets the calling thread's OpenMP and MKL counts, and the count every later
    thread starts from; the second call (in a thread of its own, which then ends) puts only the latter
    back to 1. Between the two, a thread computing for the first time would take the engine's count:
    engines start before the process serves anything (EnginePool.start).
    """
    if _engine_threads is None:
        return
    torch.set_num_threads(max(1, _engine_threads // share))
    follow()
    restore = threading.Thread(target=torch.set_num_threads, args=(1,), name="torch-threads-1")
    restore.start()
    restore.join()
