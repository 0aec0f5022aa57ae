"""A worker process of distributed mode: engines fed from the Redis queues of the models it loaded.

Threads: the claim loop (the caller's), one engine per model, the listener's writers, a heartbeat
(liveness key, claims kept fresh, queue and device-memory metrics) and a cancel poller. The claim loop
reads a new entry only while the engines have free rows, so busy workers leave work to idle ones, and
takes over entries idle past the reclaim time (their worker died) between reads. `stop()` (SIGTERM)
ends claiming, lets running jobs finish within the grace period, hands the rest back for others to take
over, and returns.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from redis.exceptions import RedisError

from app import metrics
from app.engine.engine import rows_needed
from app.engine.pool import EnginePool
from app.engine.programs import PROGRAMS
from app.engine.work import Work
from app.jobs import registry
from app.jobs.records import EventType, Status, utcnow
from app.jobs.redis_keys import Keys
from app.jobs.redis_lua import ttl_ms
from app.jobs.redis_writer import ENDED, JobWriter
from app.jobs.work_codec import work_from
from app.nets import Checkpoint
from app.settings import Settings
from app.worker.consumer import Delivery, QueueConsumer
from app.worker.listener import RedisListener

log = logging.getLogger(__name__)

CANCEL_POLL_SECONDS = 0.1  # a running job sees its cancellation within about one step
READ_BLOCK_MS = 500  # how long one XREADGROUP waits: bounds how late SIGTERM or a freed row is noticed
HANDED_BACK_WAIT_SECONDS = 5.0  # for the engines to drop the jobs handed back at shutdown
PRUNE_EVERY_HEARTBEATS = 20  # how often a worker forgets the consumers of workers that are gone


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(eq=False)
class Claim:
    """A job this worker took from the queue and has not finished with."""

    delivery: Delivery
    work: Work
    rows: int
    cancel_sent: bool = False
    dropped: bool = False


class Worker:
    """Runs the engines of `checkpoints` on jobs from Redis until `stop()`."""

    def __init__(
        self, settings: Settings, checkpoints: dict[str, Checkpoint], client: redis.Redis, *, name: str
    ):
        self.settings = settings
        self.name = name
        self.redis = client
        self.keys = Keys()
        self.writer = JobWriter(client, settings.job_ttl_seconds, keys=self.keys)
        self.queue = QueueConsumer(
            client,
            self.keys,
            name=name,
            models=list(checkpoints),
            reclaim_idle_ms=ttl_ms(settings.reclaim_idle_seconds),
            max_deliveries=settings.max_deliveries,
        )
        self.listener = RedisListener(self.writer, on_end=self._ended)
        self.pool = EnginePool(
            checkpoints,
            listener=self.listener,
            max_batch=settings.max_batch,
            policy=settings.engine_policy,
            fast=settings.fast_path(),
        )
        self.listener.stop_job = self.pool.cancel
        self.info = registry.WorkerInfo(
            name=name,
            models=list(checkpoints),
            device=settings.resolved_device(),
            max_batch=settings.max_batch,
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=time.time(),
        )
        self.specs = [registry.ModelSpec.of(ckpt) for ckpt in checkpoints.values()]
        self._claims: dict[str, Claim] = {}
        self._changed = threading.Condition()  # guards _claims; notified when a claim ends
        self._stopping = threading.Event()  # no more claiming
        self._done = threading.Event()  # side threads end
        self._heartbeat_ttl = ttl_ms(3 * settings.worker_heartbeat_seconds)
        self.engine_died = False
        self._memory_failed = False  # logged once

    # ---- life cycle ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask `run` to wind down (safe from a signal handler: it only sets a flag)."""
        self._stopping.set()

    def run(self, on_started: Callable[[], None] | None = None) -> None:
        """Serve until `stop()` (or until an engine thread dies or hangs: `engine_died`), then shut down;
        returns when everything has stopped. `on_started`: called once the engines have warmed up (minutes
        with compilation or CUDA graphs), before any job is claimed."""
        self.pool.start()
        if on_started is not None:
            on_started()
        self._update_device_memory()  # the models are on the device: their weights are in the first reading
        announced = self._announce()
        threads = [
            threading.Thread(target=self._heartbeat_loop, name="ddpm-heartbeat", daemon=True),
            threading.Thread(target=self._cancel_loop, name="ddpm-cancel-poll", daemon=True),
        ]
        for thread in threads:
            thread.start()
        if announced:  # not the URL: a password
            log.info("worker %s: serving %s", self.name, ", ".join(self.info.models))
        try:
            self._claim_loop()
        finally:
            self._shutdown()
            self._done.set()
            for thread in threads:
                thread.join(5)
            self._retire()

    def _announce(self) -> bool:
        """Publish this worker and its models, then resume what a previous process of the same name left
        pending. Each step is retried alone while Redis is away: the leftovers are claimed once (each
        claim counts a delivery), and a job already started is not started again. False if asked to
        stop before Redis answered."""
        self._until_connected(
            lambda: registry.publish(self.redis, self.keys, self.info, self.specs, self._heartbeat_ttl)
        )
        self._until_connected(self.queue.ensure_groups)
        leftovers: dict[tuple[str, str], Delivery] = {}
        self._until_connected(lambda: self.queue.own_leftovers(leftovers))
        for delivery in leftovers.values():
            self._until_connected(lambda delivery=delivery: self._start_all([delivery]))
        return not self._stopping.is_set()

    def _until_connected(self, step) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            try:
                step()
                return
            except RedisError as e:
                log.warning("worker %s: Redis unavailable (%s); retrying in %.1f s", self.name, e, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 2.0)

    # ---- claiming ------------------------------------------------------------------------------
    def free_rows(self) -> int:
        with self._changed:
            return self.settings.max_batch - sum(c.rows for c in self._claims.values())

    def _claim_loop(self) -> None:
        next_takeover = 0.0
        delay = 0.1
        while not self._stopping.is_set():
            if not self.pool.alive:  # its jobs would never end: give them to others and exit non-zero
                log.error("worker %s: an engine thread died; handing its jobs back and exiting", self.name)
                self.engine_died = True
                return
            limit = self.settings.engine_stall_seconds
            if hung := self.pool.stalled(limit):  # alive, but its jobs would never end either
                log.error(
                    "worker %s: the engine of %s has been in one step for over %.0f s "
                    "(DDPM_ENGINE_STALL_SECONDS); handing its jobs back and exiting",
                    self.name,
                    ", ".join(hung),
                    limit,
                )
                self.engine_died = True
                return
            try:
                free = self.free_rows()
                if free <= 0:
                    with self._changed:
                        self._changed.wait(READ_BLOCK_MS / 1000)
                    continue
                if time.monotonic() >= next_takeover:
                    if not self._take_over():  # else free rows changed: look again at once
                        next_takeover = time.monotonic() + self.settings.worker_heartbeat_seconds
                    continue
                self._start_all(self.queue.read(count=1, block_ms=READ_BLOCK_MS))
                delay = 0.1
            except RedisError as e:
                log.warning("worker %s: Redis unavailable (%s); retrying in %.1f s", self.name, e, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 2.0)

    def _take_over(self) -> bool:
        """Take over one entry idle past the reclaim time (its worker died or stalled) and start it;
        whether there was one. One at a time, like `read`: an entry is a whole job, whatever its rows, so
        taking one per free row would hoard jobs that idle workers should run."""
        taken = self.queue.take_over(1)
        self._start_all(taken)
        return bool(taken)

    def _start_all(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            if delivery.reclaimed:
                metrics.RECLAIMS.labels(model=delivery.model).inc()
                log.info(
                    "worker %s: took over job %s (delivery %d)",
                    self.name,
                    delivery.job_id,
                    delivery.deliveries,
                )
            self._start(delivery)

    def _start(self, delivery: Delivery) -> None:
        job_id = delivery.job_id
        with self._changed:
            if job_id in self._claims:  # running here already (a retried start-up, or its own entry back)
                return
        status, created_at = self.writer.status_and_created(job_id)
        if status is None or status.terminal:  # expired, cancelled while queued, or ended: nothing to run
            self.queue.ack(delivery)
            return
        if delivery.deliveries > self.settings.max_deliveries:
            self._dead_letter(delivery)
            return
        try:
            work = work_from(delivery.fields, self.writer.inputs(job_id))
            rows = rows_needed(work)
        except (KeyError, ValueError) as e:
            self._fail(delivery, "invalid_job", f"the queued job could not be read: {e}")
            return
        with self._changed:
            self._claims[job_id] = Claim(delivery, work, rows)
            metrics.WORKER_CLAIMED.labels(model=work.model).inc()
        first = delivery.deliveries == 1 and not delivery.reclaimed  # its queue wait ends here
        self.listener.watch(work, created_at=created_at if first else None)
        self.pool.submit(work)

    def _dead_letter(self, delivery: Delivery) -> None:
        key = self.queue.dead_letter(delivery, "too many deliveries")
        metrics.DEAD_LETTERS.labels(model=delivery.model).inc()
        message = (
            f"the job was handed to a worker {delivery.deliveries} times and each stopped before "
            f"finishing it (max_deliveries = {self.settings.max_deliveries}); "
            f"it was moved to the dead-letter stream {key}"
        )
        log.error("job %s: %s", delivery.job_id, message)
        self._fail(delivery, "worker_lost", message)

    def _fail(self, delivery: Delivery, code: str, message: str) -> None:
        """End the job of an entry no engine will run as failed; counted here, where its end is written."""
        error = {"code": code, "message": message}
        fields = {"finished_at": utcnow(), "error": error}
        # Not the message: it may quote the job's parameters. The code says what went wrong.
        log.warning("worker %s: job %s of %s failed: %s", self.name, delivery.job_id, delivery.model, code)
        outcome = self.writer.end(delivery.job_id, Status.FAILED, (EventType.ERROR, error), fields)
        if outcome == ENDED:
            kind = delivery.fields.get(b"kind", b"").decode(errors="replace")
            kind = kind if kind in PROGRAMS else "unknown"  # an entry that cannot be read: a bounded label
            metrics.JOBS.labels(kind=kind, outcome=str(Status.FAILED)).inc()
        self.queue.ack(delivery)

    def _ended(self, job_id: str, acknowledge: bool) -> None:
        """A job ended here (listener callback, on a writer thread): finish its entry, free its rows. The
        entry is acknowledged before the claim goes, so a failed acknowledgement (RedisError, retried by
        the listener) leaves the claim, and the retry finds it."""
        with self._changed:
            claim = self._claims.get(job_id)
        if claim is None:
            return
        if acknowledge:
            self.queue.ack(claim.delivery)
        with self._changed:
            if self._claims.get(job_id) is not claim:
                return
            del self._claims[job_id]
            self._changed.notify_all()
        metrics.WORKER_CLAIMED.labels(model=claim.work.model).dec()

    # ---- side threads --------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        beats = 0
        while not self._done.wait(self.settings.worker_heartbeat_seconds):
            beats += 1
            self._update_device_memory()
            try:
                registry.heartbeat(self.redis, self.keys, self.info, self._heartbeat_ttl)
                self._keep_claims()
                if beats % PRUNE_EVERY_HEARTBEATS == 0:
                    self.queue.prune_consumers()
                for model, stats in self.queue.stats().items():
                    metrics.QUEUE_WAITING.labels(model=model).set(stats.waiting)
                    metrics.QUEUE_PENDING.labels(model=model).set(stats.pending)
                    metrics.QUEUE_LAG.labels(model=model).set(stats.lag)
            except RedisError as e:
                log.warning("worker %s: heartbeat failed: %s", self.name, e)

    def _update_device_memory(self) -> None:
        """`ddpm_device_memory_bytes` of this worker's device (a no-op on a CPU), whatever Redis does."""
        try:
            metrics.update_device_memory(self.info.device)
        except Exception as e:  # a metric must never stop the heartbeat
            if not self._memory_failed:
                log.warning("worker %s: cannot read the device's memory use: %s", self.name, e)
            self._memory_failed = True

    def _entries(self) -> dict[str, list[str]]:
        """This worker's live claims as queue -> entry ids."""
        entries: dict[str, list[str]] = {}
        with self._changed:
            for claim in self._claims.values():
                if not claim.dropped:
                    entries.setdefault(claim.delivery.queue, []).append(claim.delivery.entry_id)
        return entries

    def _keep_claims(self) -> None:
        """Renew this worker's claims; stop the jobs another worker took over (this one stalled)."""
        lost = self.queue.keep_alive(self._entries())
        if lost:
            with self._changed:
                taken = [c for c in self._claims.values() if c.delivery.entry_id in lost]
            for claim in taken:
                log.warning(
                    "worker %s: job %s was taken over by another worker; stopping it here",
                    self.name,
                    claim.work.job_id,
                )
                self._drop(claim)

    def _drop(self, claim: Claim) -> None:
        claim.dropped = True
        self.listener.drop(claim.work.job_id)
        self.pool.cancel(claim.work.job_id, claim.work.model)

    def _cancel_loop(self) -> None:
        while not self._done.wait(CANCEL_POLL_SECONDS):
            with self._changed:
                watched = {
                    job_id: c for job_id, c in self._claims.items() if not (c.cancel_sent or c.dropped)
                }
            if not watched:
                continue
            try:
                stop = self.writer.to_stop(list(watched))
            except RedisError:
                continue  # the heartbeat logs Redis outages
            for job_id in stop:
                claim = watched[job_id]
                claim.cancel_sent = self.pool.cancel(job_id, claim.work.model)

    # ---- shutdown ------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        grace = 0.0 if self.engine_died else self.settings.worker_grace_seconds
        deadline = time.monotonic() + grace
        with self._changed:
            if self._claims and grace > 0:
                log.info(
                    "worker %s: finishing %d job(s) (grace %.0f s)",
                    self.name,
                    len(self._claims),
                    grace,
                )
            while self._claims and time.monotonic() < deadline:
                self._changed.wait(max(0.0, min(0.5, deadline - time.monotonic())))
            remaining = list(self._claims.values())
        if remaining:
            log.info("worker %s: handing back %d job(s)", self.name, len(remaining))
            for claim in remaining:
                claim.dropped = True
                self.listener.drop(claim.work.job_id)
            try:
                self.queue.hand_back(self._entries_of(remaining))
            except RedisError as e:
                log.warning(
                    "worker %s: could not hand back (%s); they are taken over after %.0f s",
                    self.name,
                    e,
                    self.settings.reclaim_idle_seconds,
                )
            if not self.engine_died:  # a dead engine reports nothing: there is nothing to wait for
                for claim in remaining:
                    self.pool.cancel(claim.work.job_id, claim.work.model)
                with self._changed:
                    self._changed.wait_for(lambda: not self._claims, HANDED_BACK_WAIT_SECONDS)
        self.pool.stop(HANDED_BACK_WAIT_SECONDS)
        self.listener.close(deadline=max(deadline, time.monotonic() + 1.0))

    def _retire(self) -> None:
        """Leave the live workers; after the heartbeat thread has stopped, so no beat comes after."""
        try:
            registry.retire(self.redis, self.keys, self.name)
        except RedisError as e:
            log.warning("worker %s: could not retire its heartbeat (%s); it expires by itself", self.name, e)
        log.info("worker %s: stopped", self.name)

    @staticmethod
    def _entries_of(claims: list[Claim]) -> dict[str, list[str]]:
        entries: dict[str, list[str]] = {}
        for claim in claims:
            entries.setdefault(claim.delivery.queue, []).append(claim.delivery.entry_id)
        return entries
