"""CPU threads: the engine threads compute in parallel, every other thread of the process in one thread.

PyTorch's CPU build runs its intra-op parallelism on OpenMP, and libgomp gives every thread that opens a
parallel region a team of worker threads of its own, kept for the life of that thread. Once a process
holds more of them than it has CPUs, libgomp stops spinning between regions in every team and sleeps on
a futex instead (its "throttled" spin count); a U-Net step opens hundreds of short regions and then waits
for a wake-up at each. On two cores, a forward in the engine thread took 26.7 ms instead of 11.5 (bf16,
batch 1) and 73 instead of 50 (batch 16) once the main thread had computed in parallel, as loading a
checkpoint does (docs/benchmarks.md, session 8).

So a process that serves (`ddpm-serve` embedded, `ddpm-worker`) calls `confine()` before any torch work:
torch's count becomes 1, which every thread takes at its first parallel operation, and each engine
thread calls `take()` first, which gives that thread alone the count the process had (`OMP_NUM_THREADS`,
else torch's default, the cores). Several engines on one CPU each take the whole count; they share the
cores anyway. Without `confine()` (the CLI, tests, library use) `take()` changes nothing.
"""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger(__name__)

_engine_threads: int | None = None  # the count engine threads take; None until confine()


def confine() -> int:
    """Make torch single-threaded in every thread but the engines'; returns the engines' count.

    Call it first, before any torch computation: a thread that has already computed in parallel keeps its
    team (and so the slowdown) whatever is set later.
    """
    global _engine_threads
    if _engine_threads is None:
        _engine_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        torch.get_num_threads()  # this thread's count is now fixed at 1 (torch sets it at first use)
        log.info("intra-op threads: %d in each engine thread, 1 elsewhere", _engine_threads)
    return _engine_threads


def for_engines() -> int:
    """The intra-op threads an engine thread computes with."""
    return torch.get_num_threads() if _engine_threads is None else _engine_threads


def take() -> None:
    """In an engine thread, before its first computation: give this thread the process's threads.

    `torch.set_num_threads` sets the calling thread's OpenMP and MKL counts, and the count every later
    thread starts from; the second call (in a thread of its own, which then ends) puts only the latter
    back to 1, so the threads started from now on stay single-threaded.
    """
    if _engine_threads is None:
        return
    torch.set_num_threads(_engine_threads)
    torch.get_num_threads()  # fixes this thread's count: torch would otherwise set it at first use
    restore = threading.Thread(target=torch.set_num_threads, args=(1,), name="torch-threads-1")
    restore.start()
    restore.join()
