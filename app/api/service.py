"""What the routes do with jobs, apart from HTTP: admit, submit, wait, cancel, render.

One instance per app, built in the lifespan; routes get it with `ServiceDep`. It speaks only to the
`JobStore` and a `Dispatcher` (app/api/dispatch.py: engines in this process, or Redis Streams read by
workers), so the same code serves the embedded and the distributed mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import secrets
from typing import Any

import numpy as np

from app import metrics
from app.api import schemas
from app.api.dispatch import CancelOutcome, Dispatcher, ModelEntry, OwnerQueueFull, QueueFull, Unavailable
from app.api.errors import ApiError, invalid, not_found
from app.api.uploads import decode_image
from app.engine.work import Work
from app.jobs import EventType, InvalidTransition, JobEnded, JobNotFound, JobRecord, JobStore, Status
from app.jobs.encoding import GRID, npy_bytes, npy_name, png_name
from app.jobs.previews import BUDGET_PARAM
from app.jobs.records import utcnow
from app.settings import Settings

__all__ = ["JobService", "ModelEntry"]

# A DELETE waits this long for the engine to confirm (it stops a running job within one step).
CANCEL_WAIT_SECONDS = 30.0
# Told to clients refused with 429: roughly the time for a busy queue to move on.
RETRY_AFTER_SECONDS = 5


def new_job_id() -> str:
    return secrets.token_hex(16)  # 128 random bits: unguessable, and URL-safe


class JobService:
    """Job operations shared by every route."""

    def __init__(self, settings: Settings, store: JobStore, dispatcher: Dispatcher):
        self.settings = settings
        self.store = store
        self.dispatcher = dispatcher

    @property
    def models(self) -> dict[str, ModelEntry]:
        return self.dispatcher.models()

    def model(self, name: str | None) -> ModelEntry:
        """The named model, or the default one; 404 naming the loaded models otherwise."""
        if not self.models:  # distributed mode before any worker has published its models
            raise ApiError(
                503,
                "not_ready",
                "no model is available yet: no worker has started",
                headers={"Retry-After": "5"},
            )
        entry = self.models.get(name if name is not None else (self.dispatcher.default_model() or ""))
        if entry is None:
            raise ApiError(404, "unknown_model", f"no model {name!r}; loaded: {', '.join(self.models)}")
        return entry

    def max_steps(self, entry: ModelEntry) -> int:
        return min(entry.timesteps, self.settings.max_steps or entry.timesteps)

    def preview_every(self, steps: int, stream_every: int) -> int:
        """The preview stride a job gets: `stream_every`, coarsened so that a job of `steps` engine steps
        records at most `max_preview_events` previews (each holds base64 PNGs of every image, kept for
        replay until the job expires). The engine previews every k-th step and the last: ⌈steps / k⌉."""
        if stream_every <= 0:
            return 0
        return max(stream_every, math.ceil(steps / self.settings.max_preview_events))

    def check_input_bytes(self, size: int, what: str) -> None:
        """413 `input_too_large` when a request's inputs take `size` bytes as float32, more than
        `max_input_bytes`: they are kept with the job (in Redis, distributed) until it ends, and a small
        PNG of a flat image decodes to many times its size. `what`: the inputs, as the message names them."""
        limit = self.settings.max_input_bytes
        if size > limit:
            raise ApiError(
                413,
                "input_too_large",
                f"{what} decode to {size:,} bytes of float32, more than the {limit:,} this server accepts "
                "per request (DDPM_MAX_INPUT_BYTES); send fewer or smaller images",
            )

    async def decode_uploads(self, uploads: dict[str, str], entry: ModelEntry) -> np.ndarray:
        """Uploaded base64 images, keyed by request field -> (m, C, H, W) float32, decoded off the event
        loop; 413 when they would decode to more than `max_input_bytes` (refused before decoding), 400
        (bad data) or 422 (wrong size or channels) naming the field."""
        c, r, m = entry.ckpt.channels, entry.ckpt.resolution, len(uploads)
        self.check_input_bytes(
            m * c * r * r * 4, f"{', '.join(uploads) if m <= 2 else f'{m} images'} ({c}×{r}×{r})"
        )

        def decode() -> np.ndarray:
            return np.stack(
                [
                    decode_image(
                        text,
                        resolution=entry.ckpt.resolution,
                        channels=entry.ckpt.channels,
                        max_bytes=self.settings.max_body_bytes,
                        max_pixels=self.settings.max_upload_pixels,
                        field=field,
                    )
                    for field, text in uploads.items()
                ]
            )

        return await asyncio.to_thread(decode)

    async def job_image(
        self, job_id: str, index: int, entry: ModelEntry, *, owner: str | None, prefix: str = ""
    ) -> np.ndarray:
        """Image `index` of an earlier job of `owner`'s, as its exact float values (C, H, W).

        404 if the job is unknown or not the caller's, 422 if it ran on another model, makes no images
        (likelihood) or has no such image, 409 while it has not succeeded. `prefix` locates the source in
        the request ("a.").
        """
        job = await self.get(job_id, owner)
        if job.model != entry.name:
            raise invalid(f"{prefix}job", f"job {job.id} ran on model {job.model}, not {entry.name}")
        if job.kind == "likelihood":
            raise invalid(f"{prefix}job", f"job {job.id} is a likelihood job: it makes no images to use")
        self.require_succeeded(job)
        count = int((job.result or {}).get("image_count", 0))
        if not 0 <= index < count:
            have = f"images 0..{count - 1}" if count else "no images"
            raise invalid(f"{prefix}index", f"job {job.id} has {have}, not image {index}")
        data = await self.result(job, npy_name(index))
        return np.load(io.BytesIO(data), allow_pickle=False)[0]

    async def submit(
        self,
        *,
        kind: str,
        model: str,
        params: dict[str, Any],
        work_params: dict[str, Any],
        inputs: dict[str, np.ndarray] | None,
        seed: int | None,
        steps: int,
        stream_every: int,
        owner: str | None,
    ) -> JobRecord:
        """Create a queued job and hand it to its model's engine or queue; 429 when the queue is full.

        `steps` is the job's engine steps in total (its progress denominator); `stream_every` the
        requested preview stride, recorded in both params as the stride it gets (`preview_every`).
        """
        every = self.preview_every(steps, stream_every)
        params, work_params = {**params, "stream_every": every}, {**work_params, "stream_every": every}
        if every:  # the bytes of previews the job may store (app/jobs/previews.py), whoever runs it
            work_params[BUDGET_PARAM] = self.settings.max_preview_bytes
        if inputs:
            self.check_input_bytes(
                sum(4 * int(array.size) for array in inputs.values()),
                "the job's inputs (" + ", ".join(inputs) + ")",
            )
        job = JobRecord(
            id=new_job_id(), kind=kind, model=model, params=params, seed=seed, owner=owner, steps=steps
        )
        work = Work(job_id=job.id, kind=kind, model=model, params=work_params, inputs=inputs or {})
        try:
            await self.dispatcher.submit(job, work)
        except OwnerQueueFull as e:
            raise ApiError(
                429,
                "key_queue_full",
                f"this API key has {e.limit} jobs waiting already, its most (DDPM_MAX_QUEUED_JOBS_PER_KEY); "
                "retry when some have started",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None
        except QueueFull:
            raise ApiError(
                429,
                "queue_full",
                f"{self.settings.max_queued_jobs} jobs are already waiting (DDPM_MAX_QUEUED_JOBS); "
                "retry in a few seconds",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None
        except Unavailable as e:
            await self._end(job.id, Status.FAILED, error={"code": "engine_unavailable", "message": str(e)})
            raise ApiError(503, "engine_unavailable", str(e)) from e
        return job

    async def get(self, job_id: str, owner: str | None) -> JobRecord:
        job = await self.store.get(job_id, owner=owner)
        if job is None:
            raise not_found(f"job {job_id}")
        return job

    async def event_count(self, job_id: str) -> int:
        """How many events the job has recorded so far; 404 if it expired meanwhile."""
        try:
            return await self.store.event_count(job_id)
        except JobNotFound:
            raise not_found(f"job {job_id}") from None

    async def wait(self, job_id: str, timeout: float | None) -> None:
        """Return when the job has ended (its final event is recorded) or after `timeout` seconds."""
        if timeout is not None and math.isinf(timeout):
            timeout = None
        with contextlib.suppress(TimeoutError, JobNotFound):
            async with asyncio.timeout(timeout):
                async with contextlib.aclosing(self.store.events(job_id)) as events:
                    async for _ in events:
                        pass

    async def cancel(self, job: JobRecord) -> JobRecord:
        """Cancel a job and return it once it has ended (cancelled, or whatever it ended as first)."""
        if job.status.terminal:
            return job
        # A job the engine does not know is either ending right now (its end is on its way to the
        # store) or between the queue and its first step: look again after a moment.
        for _ in range(2):
            outcome = await self.dispatcher.cancel(job)
            if outcome is CancelOutcome.NO_RUNNER:
                break
            accepted = outcome is CancelOutcome.REQUESTED
            await self.wait(job.id, CANCEL_WAIT_SECONDS if accepted else 1.0)
            current = await self.get(job.id, job.owner)
            if current.status.terminal:
                return current
            if accepted:
                break  # accepted but not confirmed in time: the engine (or worker) is stuck
        # Nothing can end it (the engine died, or never received the job): end the job here.
        await self._end(job.id, Status.CANCELLED)
        return await self.get(job.id, job.owner)

    async def _end(self, job_id: str, status: Status, error: dict[str, str] | None = None) -> None:
        """End a job that nothing else will end. Counted in ddpm_jobs_total only once its final event
        is written here: a job whose runner or worker ended it first was counted there."""
        with contextlib.suppress(InvalidTransition, JobNotFound, JobEnded):
            job = await self.store.update(job_id, status=status, finished_at=utcnow(), error=error)
            if error is not None:
                await self.store.append_event(job_id, EventType.ERROR, error)
            else:
                await self.store.append_event(job_id, EventType.DONE, {"status": str(status)})
            metrics.JOBS.labels(kind=job.kind, outcome=str(status)).inc()

    @staticmethod
    def require_succeeded(job: JobRecord) -> None:
        """409 unless the job has succeeded (its results exist only then)."""
        if job.status is not Status.SUCCEEDED:
            state = "has not finished" if not job.status.terminal else f"ended as {job.status}"
            raise ApiError(409, "not_finished", f"job {job.id} {state}; results exist once it has succeeded")

    @staticmethod
    def require_images(job: JobRecord) -> None:
        """404 `no_images` for a job that never makes images (likelihood: its result is numbers), so
        that a download from it is not mistaken for an unknown or expired job."""
        if job.kind == "likelihood":
            raise ApiError(
                404,
                "no_images",
                f"job {job.id} is a likelihood job: it makes no images to download; its result is in the "
                f"job object (GET /jobs/{job.id}: result.bits_per_dim, result.terms)",
            )

    async def result(self, job: JobRecord, name: str, *, index: int | None = None) -> bytes:
        """One stored result blob; 404 `no_images` for a likelihood job, 409 while the job has not
        succeeded, 404 `no_such_image` naming the images the job has when `index` (of the image stored
        as `name`) is out of range, 404 if it has no such blob."""
        self.require_images(job)
        self.require_succeeded(job)
        count = int((job.result or {}).get("image_count", 0))
        if index is not None and not 0 <= index < count:
            have = f"images 0..{count - 1}" if count else "no images"
            raise ApiError(404, "no_such_image", f"job {job.id} has {have}, not image {index}")
        data = await self.store.get_result(job.id, name)
        if data is None:
            raise not_found(f"result {name} of job {job.id}")
        return data

    async def images_npy(self, job: JobRecord) -> bytes:
        """All images of a job as one (n, C, H, W) float32 .npy, assembled from the per-image blobs."""
        await self.result(job, npy_name(0))  # 409 unless it succeeded; 404 if it made no images
        count = int((job.result or {}).get("image_count", 0))
        blobs = [await self.result(job, npy_name(k)) for k in range(count)]
        return npy_bytes(np.concatenate([np.load(io.BytesIO(b), allow_pickle=False) for b in blobs]))

    def queue_position(self, job: JobRecord) -> int | None:
        return self.dispatcher.queue_position(job) if job.status is Status.QUEUED else None

    def render(self, job: JobRecord) -> schemas.Job:
        """The public job object of API.md: URLs, queue position and result links added."""
        base = f"/jobs/{job.id}"
        result: dict[str, Any] | None = None
        if job.result is not None:
            result = dict(job.result)
            count = int(result.pop("image_count", 0))
            if count:
                ext = "npy" if job.params.get("output") == "npy" else "png"
                name = npy_name if ext == "npy" else png_name
                result["images"] = [{"url": f"{base}/images/{name(k)}"} for k in range(count)]
                result["grid_url"] = f"{base}/{GRID}"
                result["npy_url"] = f"{base}/images.npy"
        return schemas.Job(
            id=job.id,
            kind=job.kind,
            model=job.model,
            status=job.status.value,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            queue_position=self.queue_position(job),
            progress=schemas.Progress(step=job.step, steps=job.steps),
            seed=job.seed,
            params=job.params,
            result=result,
            error=job.error,
            urls=schemas.JobUrls(self=base, stream=f"/stream/{job.id}"),
        )
