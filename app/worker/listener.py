"""The engine's `Listener` in a worker: engine callbacks become Redis writes, off the engine thread.

Callbacks capture what they need and hand off to a writer thread (one per job, picked by a hash of its
id, so a job's writes stay in order); there the tensors are encoded (app/jobs/encoding.py) and written.
Progress is best effort (dropped while Redis is away); a job's start and end are retried until Redis
answers or the worker's shutdown deadline passes. A job ends through `JobWriter.end`, which stores its
result only if it has not ended yet, and only then is its queue entry acknowledged (`on_end`).

Metrics, as the embedded runner keeps them: jobs and images that ended here, queue wait (creation to the
first step, observed on a job's first delivery only) and job duration (first step here to the end).
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import torch
from redis.exceptions import RedisError

from app import metrics
from app.engine import threads as torch_threads
from app.engine.work import Work
from app.jobs.encoding import BrokenJobs, encoding_failure, preview_pngs, result_blobs
from app.jobs.previews import PreviewBudget
from app.jobs.records import EventType, Status, utcnow
from app.jobs.redis_writer import ENDED, JobWriter
from app.jobs.runner import grid_columns
from app.jobs.store import InvalidTransition, JobNotFound

log = logging.getLogger(__name__)

_BACKOFF_START, _BACKOFF_MAX = 0.1, 2.0


@dataclass
class _Watched:
    work: Work
    created_at: datetime | None = None  # the job's creation, on its first delivery only (for queue wait)
    started: datetime | None = None  # its first step here
    steps: int = 0  # known once the engine starts the job
    dropped: bool = False  # handed back or taken over: a cancellation here is not the user's
    previews: PreviewBudget = field(init=False)  # the bytes of previews it may still store

    def __post_init__(self) -> None:
        self.previews = PreviewBudget.of(self.work.params)


class RedisListener:
    """Writes what the engines report into Redis. `on_end(job_id, acknowledge)` is called once per job
    that ended here (acknowledge: whether its queue entry is done with), from a writer thread."""

    def __init__(self, writer: JobWriter, *, on_end: Callable[[str, bool], None], threads: int = 2):
        self._writer = writer
        self._on_end = on_end
        self._threads = [
            ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"ddpm-writer-{i}", initializer=torch_threads.follow
            )
            for i in range(threads)
        ]
        self._jobs: dict[str, _Watched] = {}
        self._broken = BrokenJobs()
        self.stop_job: Callable[[str, str], object] | None = None  # (job id, model): cancel in the engine
        self._lock = threading.Lock()  # guards _jobs: the claim loop, engine, heartbeat and writer threads
        self._deadline: float | None = None  # time.monotonic() after which retries give up

    def watch(self, work: Work, created_at: datetime | None = None) -> None:
        """Register a job before submitting it to the engine. `created_at`: when the job was created, to
        observe its queue wait at its first step; None for a job that ran before (a takeover), whose
        first step was earlier, elsewhere."""
        with self._lock:
            self._jobs[work.job_id] = _Watched(work, created_at=created_at)

    def drop(self, job_id: str) -> None:
        """The job is no longer this worker's (handed back, or taken over): its engine cancellation, which
        the caller asks for next, releases its slot without recording anything."""
        with self._lock:
            if job_id in self._jobs:
                self._jobs[job_id].dropped = True

    # Listener: called on an engine thread.

    def on_started(self, job_id: str, steps: int) -> None:
        started = utcnow()
        with self._lock:
            watched = self._jobs.get(job_id)
            if watched is not None:
                watched.steps, watched.started = steps, started
        if watched is not None and watched.created_at is not None:
            wait = max(0.0, (started - watched.created_at).total_seconds())  # hosts' clocks may differ a bit
            metrics.QUEUE_WAIT_SECONDS.labels(kind=watched.work.kind).observe(wait)

        def write() -> None:
            try:
                self._retry(
                    lambda: self._writer.update(
                        job_id, status=Status.RUNNING, started_at=started, step=0, steps=steps
                    )
                )
            except (JobNotFound, InvalidTransition) as e:
                # Cancelled while queued (after this worker read its entry), or ended elsewhere: stop
                # computing it now rather than at the next cancel poll; nothing of it is recorded.
                log.info("job %s: not marked running: %s; stopping it", job_id, e)
                if watched is not None and self.stop_job is not None:
                    self.stop_job(job_id, watched.work.model)

        self._post(job_id, write)

    def on_progress(
        self, job_id: str, step: int, steps: int, t: int, x0: torch.Tensor | None, xt: torch.Tensor | None
    ) -> None:
        with self._lock:  # now: the engine's end of the job may forget it before the writer runs
            watched = self._jobs.get(job_id)
        budget = watched.previews if watched is not None else PreviewBudget(0)  # not tracked: no images

        def write() -> None:
            preview = None
            if x0 is not None and xt is not None:
                try:
                    preview = budget.event(step, steps, t, x0, xt, preview_pngs)
                except Exception as e:  # as embedded: the job fails, and the engine stops it
                    self._preview_failed(job_id, watched, e)
                    return
            try:
                self._writer.progress(job_id, step, steps, preview)
            except RedisError as e:
                log.debug("job %s: progress dropped: %s", job_id, e)

        self._post(job_id, write)

    def on_finished(self, job_id: str, images: torch.Tensor, extra: dict[str, Any]) -> None:
        watched, finished = self._forget(job_id), utcnow()
        work, steps = (watched.work, watched.steps) if watched is not None else (None, 0)
        started = watched.started if watched is not None else None

        def write() -> None:
            try:
                blobs = result_blobs(images, grid_columns=grid_columns(work) if work is not None else None)
            except Exception as e:  # the job fails, and ends: its slot frees and its entry is acknowledged
                log.exception("job %s: encoding its images failed", job_id)
                error = encoding_failure(e)
                fields = {"finished_at": finished, "error": error}
                self._end(job_id, work, Status.FAILED, (EventType.ERROR, error), fields, started=started)
                return
            count = int(images.shape[0])
            fields = {
                "finished_at": finished,
                "result": {**extra, "image_count": count},
                "step": steps,
                "steps": steps,
            }
            event = (EventType.DONE, {"status": str(Status.SUCCEEDED)})
            self._end(job_id, work, Status.SUCCEEDED, event, fields, blobs, images=count, started=started)

        self._post(job_id, write, ends=True)

    def on_failed(self, job_id: str, code: str, message: str) -> None:
        watched, finished = self._forget(job_id), utcnow()
        work = watched.work if watched is not None else None
        started = watched.started if watched is not None else None
        error = {"code": code, "message": message}

        def write() -> None:
            self._end(
                job_id,
                work,
                Status.FAILED,
                (EventType.ERROR, error),
                {"finished_at": finished, "error": error},
                started=started,
            )

        self._post(job_id, write, ends=True)

    def on_cancelled(self, job_id: str) -> None:
        watched, finished = self._forget(job_id), utcnow()
        work = watched.work if watched is not None else None
        if watched is not None and watched.dropped:  # stopped here, not cancelled: someone else runs it
            self._post(job_id, lambda: self._on_end(job_id, False), ends=True)
            return

        started = watched.started if watched is not None else None

        def write() -> None:
            event = (EventType.DONE, {"status": str(Status.CANCELLED)})
            self._end(job_id, work, Status.CANCELLED, event, {"finished_at": finished}, started=started)

        self._post(job_id, write, ends=True)

    # On a writer thread.

    def _preview_failed(self, job_id: str, watched: _Watched | None, error: Exception) -> None:
        """A preview could not be encoded: the engine is asked to stop the job, which fails here (its
        entry done with), and what the engine still sends for it is dropped (`_post(..., ends=True)`).
        A job this worker has handed back or lost (dropped) is left to its new owner."""
        log.exception("job %s: encoding a preview failed", job_id)
        if watched is None or watched.dropped:
            return
        self._broken.add(job_id)
        with self._lock:
            running = job_id in self._jobs  # else the engine has ended it already
        if running and self.stop_job is not None:  # first: no computing for a job already failed
            self.stop_job(job_id, watched.work.model)
        error_fields = encoding_failure(error)
        fields = {"finished_at": utcnow(), "error": error_fields}
        event = (EventType.ERROR, error_fields)
        self._end(job_id, watched.work, Status.FAILED, event, fields, started=watched.started)

    def _end(
        self,
        job_id: str,
        work: Work | None,
        status: Status,
        event: tuple[EventType, dict[str, Any]],
        fields: dict[str, Any],
        blobs: dict[str, bytes] | None = None,
        *,
        images: int = 0,
        started: datetime | None = None,
    ) -> None:
        try:
            outcome = self._retry(lambda: self._writer.end(job_id, status, event, fields, blobs))
        except RedisError:
            log.warning(
                "job %s: could not record its end before shutdown; another worker will redo it", job_id
            )
            self._on_end(job_id, False)
            return
        if outcome == ENDED and work is not None:
            metrics.JOBS.labels(kind=work.kind, outcome=str(status)).inc()
            finished = fields.get("finished_at")
            if started is not None and finished is not None:  # as embedded: from its first step to its end
                metrics.JOB_SECONDS.labels(kind=work.kind).observe((finished - started).total_seconds())
            if images:
                metrics.IMAGES.labels(model=work.model).inc(images)
        elif outcome == str(Status.CANCELLED):
            # Its client cancelled it (the API ended it, queued, while this worker was taking it up, or
            # gave up waiting for its end), or another worker ended it so: counted where it was ended.
            log.info("job %s: %s here, but it had been cancelled: nothing stored", job_id, status)
        elif outcome != ENDED:
            log.info(
                "job %s: %s here, but it had already ended (%s): nothing stored", job_id, status, outcome
            )
            if work is not None and outcome in (str(Status.SUCCEEDED), str(Status.FAILED)):
                # Another worker's end (a takeover race); "missing" (expired) or a status that has
                # not ended is no such race, only logged.
                metrics.DUPLICATE_ENDS.labels(model=work.model).inc()
        try:
            self._retry(lambda: self._on_end(job_id, True))
        except RedisError:
            log.warning(
                "job %s: ended, but its queue entry could not be acknowledged; it will be again", job_id
            )

    def _retry(self, write: Callable[[], Any]) -> Any:
        """`write()`, retried while Redis is unreachable, until the shutdown deadline (if one is set)."""
        delay = _BACKOFF_START
        while True:
            try:
                return write()
            except RedisError as e:
                if self._deadline is not None and time.monotonic() + delay > self._deadline:
                    raise
                log.warning("Redis write failed (%s); retrying in %.1f s", e, delay)
                time.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    def _forget(self, job_id: str) -> _Watched | None:
        with self._lock:
            return self._jobs.pop(job_id, None)

    def _post(self, job_id: str, write: Callable[[], None], *, ends: bool = False) -> None:
        """Run `write` on the job's writer thread (one per job, so its updates keep their order); `ends`:
        the engine's last word on the job."""
        thread = self._threads[zlib.crc32(job_id.encode()) % len(self._threads)]
        try:
            thread.submit(self._guarded, job_id, write, ends)
        except RuntimeError:
            log.warning("job %s: update after the writers closed, dropped", job_id)

    def _guarded(self, job_id: str, write: Callable[[], None], ends: bool) -> None:
        if self._broken.drops(job_id, ends):  # it failed here already (a preview): nothing more is recorded
            return
        try:
            write()
        except Exception:
            log.exception("job %s: could not record an engine update", job_id)

    def close(self, deadline: float) -> None:
        """Flush pending writes, retrying failed ones until `deadline` (time.monotonic())."""
        self._deadline = deadline
        for thread in self._threads:
            thread.shutdown(wait=True)
