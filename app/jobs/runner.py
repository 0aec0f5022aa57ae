"""The engine's `Listener` for the API process: engine callbacks become job status, events and results.

Callbacks arrive on the engine thread, inside the denoising loop, so they only capture what they need
and hand off. Each job is pinned to one single-threaded encoder (by a hash of its id), which turns
tensors into PNG/NPY bytes off both the engine loop and the event loop, then hops onto the event loop
with `call_soon_threadsafe`. There, each job's store writes run one after another (a chain of tasks
per job), so a job's events and status changes land in the order the engine made them, even with a
store whose writes await the network.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from app import metrics
from app.engine import threads as torch_threads
from app.engine.work import Work
from app.jobs.encoding import BrokenJobs, encoding_failure, preview_pngs, result_blobs
from app.jobs.previews import PreviewBudget
from app.jobs.records import EventType, Status, utcnow
from app.jobs.store import InvalidTransition, JobEnded, JobNotFound, JobStore

log = logging.getLogger(__name__)

Apply = Callable[[Any], Awaitable[None]]


@dataclass
class _Watched:
    """What the runner needs to know of a job it was told about before the engine saw it."""

    kind: str
    model: str
    stream_every: int
    grid_columns: int | None
    submitted: float  # time.monotonic()
    previews: PreviewBudget  # the bytes of previews it may still store
    steps: int = 0  # known once the engine starts the job


def grid_columns(work: Work) -> int | None:
    # Interpolation grids have one row per t and one column per λ (API.md); others are near-square.
    lambdas = work.params.get("lambdas")
    return len(lambdas) if work.kind == "interpolate" and lambdas else None


class JobRunner:
    """A `Listener` (app.engine.work) writing into a `JobStore` that lives on `loop`."""

    def __init__(self, store: JobStore, loop: asyncio.AbstractEventLoop, *, encoders: int = 2):
        self._store = store
        self._loop = loop
        self._encoders = [
            ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"ddpm-encode-{i}", initializer=torch_threads.follow
            )
            for i in range(encoders)
        ]
        self._watched: dict[str, _Watched] = {}
        self._ending: set[str] = set()  # jobs the engine has ended whose end is not in the store yet
        self._broken = BrokenJobs()
        self.stop_job: Callable[[str, str], object] | None = None  # (job id, model): cancel in the engine
        self._lock = threading.Lock()  # guards _watched and _ending: loop, engine and encoders
        self._tails: dict[str, asyncio.Task[None]] = {}  # event loop only

    def watch(self, work: Work) -> None:
        """Register a job before submitting it to the engine (its kind, preview cadence, grid shape)."""
        watched = _Watched(
            kind=work.kind,
            model=work.model,
            stream_every=int(work.params.get("stream_every", 0)),
            grid_columns=grid_columns(work),
            submitted=time.monotonic(),
            previews=PreviewBudget.of(work.params),
        )
        with self._lock:
            self._watched[work.job_id] = watched

    def forget(self, job_id: str) -> None:
        """Drop a job the engine never accepted."""
        with self._lock:
            self._watched.pop(job_id, None)

    def ending(self, job_id: str) -> bool:
        """Whether the engine has ended the job and its end (results, status) is on its way to the store:
        a cancel then has nothing to stop, and must wait for that end rather than overwrite it."""
        with self._lock:
            return job_id in self._ending

    # Listener: called on the engine thread.

    def on_started(self, job_id: str, steps: int) -> None:
        watched, started = self._lookup(job_id), utcnow()
        if watched is not None:
            watched.steps = steps
            metrics.QUEUE_WAIT_SECONDS.labels(kind=watched.kind).observe(time.monotonic() - watched.submitted)

        async def apply(_: None) -> None:
            await self._store.update(job_id, status=Status.RUNNING, started_at=started, step=0, steps=steps)

        self._post(job_id, None, apply)

    def on_progress(
        self, job_id: str, step: int, steps: int, t: int, x0: torch.Tensor | None, xt: torch.Tensor | None
    ) -> None:
        watched = self._lookup(job_id)  # now: the engine's end of the job may forget it before encode runs
        budget = watched.previews if watched is not None else PreviewBudget(0)  # not tracked: no images

        def encode() -> dict[str, Any] | None:
            if x0 is None or xt is None:  # the engine picks the preview steps
                return None
            return budget.event(step, steps, t, x0, xt, preview_pngs)

        async def apply(preview: dict[str, Any] | None) -> None:
            await self._store.update(job_id, step=step, steps=steps)
            if preview is not None:
                await self._store.append_event(job_id, EventType.PROGRESS, preview)

        self._post(job_id, encode, apply)

    def on_finished(self, job_id: str, images: torch.Tensor, extra: dict[str, Any]) -> None:
        watched, finished = self._end(job_id), utcnow()
        columns = watched.grid_columns if watched is not None else None
        steps = watched.steps if watched is not None else 0

        def encode() -> dict[str, bytes]:
            return result_blobs(images, grid_columns=columns)

        async def apply(blobs: dict[str, bytes]) -> None:
            for name, data in blobs.items():
                await self._store.put_result(job_id, name, data)
            result = {**extra, "image_count": int(images.shape[0])}
            job = await self._store.update(
                job_id, status=Status.SUCCEEDED, finished_at=finished, result=result, step=steps, steps=steps
            )
            await self._store.append_event(job_id, EventType.DONE, {"status": str(job.status)})
            self._count(
                job.kind, job.model, "succeeded", job.started_at, finished, images=int(images.shape[0])
            )

        self._post(job_id, encode, apply, ends=True)

    def on_failed(self, job_id: str, code: str, message: str) -> None:
        self._end(job_id)
        finished = utcnow()

        async def apply(_: None) -> None:
            error = {"code": code, "message": message}
            job = await self._store.update(job_id, status=Status.FAILED, finished_at=finished, error=error)
            await self._store.append_event(job_id, EventType.ERROR, error)
            self._count(job.kind, job.model, "failed", job.started_at, finished)

        self._post(job_id, None, apply, ends=True)

    def on_cancelled(self, job_id: str) -> None:
        self._end(job_id)
        finished = utcnow()

        async def apply(_: None) -> None:
            job = await self._store.update(job_id, status=Status.CANCELLED, finished_at=finished)
            await self._store.append_event(job_id, EventType.DONE, {"status": str(job.status)})
            self._count(job.kind, job.model, "cancelled", job.started_at, finished)

        self._post(job_id, None, apply, ends=True)

    # Plumbing.

    def _lookup(self, job_id: str) -> _Watched | None:
        with self._lock:
            return self._watched.get(job_id)

    def _end(self, job_id: str) -> _Watched | None:
        with self._lock:
            self._ending.add(job_id)
            return self._watched.pop(job_id, None)

    def _ended(self, job_id: str) -> None:
        with self._lock:
            self._ending.discard(job_id)

    @staticmethod
    def _count(kind: str, model: str, outcome: str, started: Any, finished: Any, *, images: int = 0) -> None:
        metrics.JOBS.labels(kind=kind, outcome=outcome).inc()
        if started is not None:
            metrics.JOB_SECONDS.labels(kind=kind).observe((finished - started).total_seconds())
        if images:
            metrics.IMAGES.labels(model=model).inc(images)

    def _post(
        self, job_id: str, encode: Callable[[], Any] | None, apply: Apply, *, ends: bool = False
    ) -> None:
        """Encode on the job's encoder thread, then apply on the event loop after the job's earlier writes.
        `ends`: this is the job's end; it stops being `ending` once applied."""
        encoder = self._encoders[zlib.crc32(job_id.encode()) % len(self._encoders)]
        try:
            encoder.submit(self._encode_then_hop, job_id, encode, apply, ends)
        except RuntimeError:
            log.warning("job %s: update after the runner closed, dropped", job_id)
            if ends:
                self._ended(job_id)

    def _encode_then_hop(
        self, job_id: str, encode: Callable[[], Any] | None, apply: Apply, ends: bool
    ) -> None:
        if self._broken.drops(job_id, ends):  # it failed already, while the engine still ran it
            if ends:
                self._ended(job_id)
            return
        try:
            payload = encode() if encode is not None else None
        except Exception as e:
            log.exception("job %s: encoding its output failed", job_id)
            payload, apply = None, self._failure(job_id, e)
            if not ends:  # a preview: the job is still running; stop it, and record nothing more of it
                self._broken.add(job_id)
                watched = self._lookup(job_id)
                if self.stop_job is not None and watched is not None:
                    self.stop_job(job_id, watched.model)
        try:
            self._loop.call_soon_threadsafe(self._chain, job_id, apply, payload, ends)
        except RuntimeError:  # the event loop is closed: the process is shutting down
            log.warning("job %s: update after the event loop closed, dropped", job_id)

    def _failure(self, job_id: str, error: Exception) -> Apply:
        async def apply(_: None) -> None:
            details, finished = encoding_failure(error), utcnow()
            job = await self._store.update(job_id, status=Status.FAILED, finished_at=finished, error=details)
            await self._store.append_event(job_id, EventType.ERROR, details)
            self._count(job.kind, job.model, "failed", job.started_at, finished)

        return apply

    def _chain(self, job_id: str, apply: Apply, payload: Any, ends: bool) -> None:
        previous = self._tails.get(job_id)
        task = self._loop.create_task(self._after(previous, job_id, apply, payload))
        if ends:
            task.add_done_callback(lambda _: self._ended(job_id))
        self._tails[job_id] = task
        task.add_done_callback(lambda done: self._untail(job_id, done))

    def _untail(self, job_id: str, task: asyncio.Task[None]) -> None:
        if self._tails.get(job_id) is task:
            del self._tails[job_id]

    @staticmethod
    async def _after(previous: asyncio.Task[None] | None, job_id: str, apply: Apply, payload: Any) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            await apply(payload)
        except (JobNotFound, InvalidTransition, JobEnded) as e:
            # Expired meanwhile, or already ended (e.g. cancelled just as it finished): nothing to record.
            log.info("job %s: update skipped: %s", job_id, e)
        except Exception:
            log.exception("job %s: could not record an engine update", job_id)

    async def drain(self) -> None:
        """Wait for every pending write (after the engines stopped and `close` flushed the encoders)."""
        while self._tails:
            await asyncio.wait(list(self._tails.values()))

    def close(self) -> None:
        """Finish pending encodings (blocking: call it off the event loop, after the engines stopped)."""
        for encoder in self._encoders:
            encoder.shutdown(wait=True)
