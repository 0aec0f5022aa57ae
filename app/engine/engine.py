"""The step-level batching engine: one thread per model, one U-Net forward per step for every row.

Each iteration (ARCHITECTURE.md): apply cancellations → admit queued work while rows are free →
stack every running row's x_t and t, run ε_θ once → apply each row's own update (DDPM, DDIM, or a
bound term), vectorised over rows → emit x̂₀ previews → retire finished groups. A new job waits at
most one step to join, never a whole chain, when its rows are free; a wide job at the head of the
queue does not hold back narrower ones behind it that cannot delay it (EASY backfilling, `_admit`).
No HTTP, no Redis: work comes in through `submit`, progress goes out through a `Listener`.

The admission policy is switchable, to measure what step-level batching buys (bench/serving.py):
"step" (the above), "request" (request-level batching: jobs join only an empty batch, and the jobs
admitted together run to completion together) and "serial" (one job at a time). Every policy gives
the same images for the same seeds; only waiting times change.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from app.engine import programs, threads
from app.engine.buffers import StepBuffers
from app.engine.fastpath import FastPath, Forward
from app.engine.groups import BoundGroup, ChainGroup, Group
from app.engine.steps import COLUMNS, compiled_update, fused_update
from app.engine.work import Listener, Work
from app.metrics import ENGINE_BATCH_SIZE, ENGINE_FORWARDS, ENGINE_SLOTS, ENGINE_STEP_SECONDS
from app.nets import Checkpoint
from app.sampling import schedule_of

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.25  # seconds between image-free progress reports of one job

Policy = Literal["step", "request", "serial"]
POLICIES: tuple[str, ...] = get_args(Policy)


class JobFailed(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# What a client is told about an unexpected exception: its type and the job id to quote, never its text,
# which may hold file paths (/tmp/torchinductor_…), device details or, for a batch, other users' jobs.
# The full exception is logged at ERROR with the job id(s).
def redacted(what: str, error: BaseException, job_id: str) -> str:
    return f"{what} ({type(error).__name__}); the server log has the details, job {job_id}"


@dataclass(eq=False)
class Run:
    """A job inside the engine: its program, the groups of its current phase, its progress."""

    work: Work
    program: programs.Program
    steps: int
    groups: list[Group] = field(default_factory=list)
    step: int = 0
    reported: float = 0.0  # time.monotonic() of the last progress report

    @property
    def job_id(self) -> str:
        return self.work.job_id

    @property
    def stream_every(self) -> int:
        return int(self.work.params.get("stream_every") or 0)


def _steps(ctx: programs.Context, work: Work) -> float:
    """The job's steps, or infinity when its parameters cannot say (it will fail when it starts)."""
    try:
        return programs.total_steps(ctx, work)
    except (KeyError, TypeError, ValueError):
        return float("inf")


def rows_needed(work: Work) -> int:
    """Rows a job holds at its widest phase, to decide whether it fits in the batch."""
    p = work.params
    if work.kind == "interpolate":  # the seeded sources are sampled first, a row each
        return max(len(p["t"]) * len(p["lambdas"]), sum(f"{side}_seed" in p for side in "ab"))
    if work.kind == "likelihood":
        return len(work.inputs["images"])
    return int(p["n"])


class Engine:
    """Owns one model on one device and runs the denoising loop for all its jobs in one thread.

    `fast` selects the forward's fast paths (app.engine.fastpath); with `fast.compile` the per-row
    update is compiled too. `start()` compiles and captures them before the loop takes any job.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        *,
        name: str,
        listener: Listener,
        max_batch: int = 64,
        policy: Policy = "step",
        fast: FastPath | None = None,
        cpu_engines: int = 1,
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.ckpt, self.name, self.listener, self.max_batch = ckpt, name, listener, max_batch
        self.policy = policy
        self.cpu_engines = cpu_engines  # CPU engines in this process: they share its threads
        self.unet = ckpt.unet.eval()
        self.device = ckpt.device
        self.fast = fast or FastPath()
        self.forward = Forward(self.unet, self.fast, device=self.device, max_batch=max_batch)
        self.buffers = StepBuffers(self.device, self.forward.memory_format)
        self._step = compiled_update() if self.fast.compile else fused_update
        self.schedule = schedule_of(ckpt).to(self.device)
        self.ctx = programs.Context(ckpt=ckpt, schedule=self.schedule, device=self.device)
        self._queue: deque[Work] = deque()
        self._cancelled: set[str] = set()
        self._cond = threading.Condition()
        self._runs: dict[str, Run] = {}
        self._active: list[Group] = []
        self._stopping = False
        self._admitting: str | None = None  # popped from the queue, not yet in _runs
        self._thread: threading.Thread | None = None
        self._busy_since: float | None = None  # when the loop's current pass began; None while it waits
        self.forwards = 0

    # ---- thread-safe control surface -------------------------------------------------------
    def start(self) -> None:
        """Start the engine's thread, which warms the fast paths up (compilation, CUDA graphs: minutes, not
        per request) and then runs the loop; returns once it is warm, raising what the warm-up raised.

        The warm-up runs in the engine's thread, not the caller's: compiled CPU kernels fix their thread
        count when compiled, and a caller computing in parallel would slow every step (app.engine.threads).
        """
        if self._thread is not None:
            raise RuntimeError(f"engine {self.name} was started already")
        ready = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, failed), name=f"engine-{self.name}", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failed:
            self._thread.join()
            raise failed[0]

    def _run(self, ready: threading.Event, failed: list[BaseException]) -> None:
        try:
            if self.device.type == "cpu":
                threads.take(self.cpu_engines)
            self.forward.warm_up(self.ctx.shape)
            if self.fast.compile:
                self._warm_up_update()
        except BaseException as e:  # start() raises it in the caller's thread
            failed.append(e)
            return
        finally:
            ready.set()
        self._loop()

    @torch.inference_mode()
    def _warm_up_update(self) -> None:
        """Compile the update for what `_iterate` passes it: x_t and z laid out as the step buffers
        are, ε as the forward returns it (dynamo guards on strides, so zeros of another layout would
        leave the first request to compile it again)."""
        for rows in (1, 2):  # dynamo specialises a batch of one apart from the dynamic-size kernel
            fmt = self.forward.memory_format
            x = torch.empty(self.forward.bucket(rows), *self.ctx.shape, device=self.device, memory_format=fmt)
            x.zero_()
            eps = self.forward(x, torch.zeros(x.shape[0], dtype=torch.long, device=self.device))[:rows]
            z = torch.zeros_like(x[:rows])
            self._step(x[:rows], eps, z, torch.zeros(rows, COLUMNS, device=self.device))

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, work: Work) -> None:
        if work.model != self.name:
            raise ValueError(f"work for model {work.model!r} sent to engine {self.name!r}")
        with self._cond:
            self._queue.append(work)
            self._cond.notify_all()

    def cancel(self, job_id: str) -> bool:
        with self._cond:
            known = (
                job_id in self._runs
                or job_id == self._admitting
                or any(w.job_id == job_id for w in self._queue)
            )
            if known:
                self._cancelled.add(job_id)
                self._cond.notify_all()
            return known

    def queue_position(self, job_id: str) -> int | None:
        with self._cond:
            for i, w in enumerate(self._queue):
                if w.job_id == job_id:
                    return i
        return None

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return sum(g.rows for g in self._active)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds the loop has spent in its current pass (a step of the running batch, admitting jobs):
        a pass that never ends is a hung engine (a stuck device call). 0 while it waits for work."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    # ---- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        log.info(
            "engine %s on %s: max_batch %d, policy %s, %s",
            self.name,
            self.device,
            self.max_batch,
            self.policy,
            self.fast,
        )
        while True:
            with self._cond:
                self._busy_since = None
                while not self._stopping and not self._queue and not self._active and not self._cancelled:
                    self._cond.wait()
                if self._stopping:
                    return
                cancelled, self._cancelled = self._cancelled, set()
                self._busy_since = time.monotonic()
            try:
                self._apply_cancellations(cancelled)
                self._admit()
                self._count_slots()
                if self._active:
                    self._iterate()
            except Exception as e:  # a fault outside any one job's code: its jobs fail, the engine goes on
                job_ids = sorted(self._runs)
                log.exception(
                    "engine %s: a step failed outside any job; failing job(s) %s",
                    self.name,
                    ", ".join(job_ids) or "none",
                )
                for job_id in job_ids:
                    self._fail(job_id, "engine_error", redacted("the engine failed on this step", e, job_id))
                self._active = []
            self._count_slots()  # also after the last job ended: the gauges go back to 0

    def _count_slots(self) -> None:
        ENGINE_SLOTS.labels(self.name, "running").set(self.running)
        ENGINE_SLOTS.labels(self.name, "waiting").set(sum(rows_needed(w) for w in list(self._queue)))

    def _apply_cancellations(self, job_ids: set[str]) -> None:
        for job_id in job_ids:
            with self._cond:
                queued = [w for w in self._queue if w.job_id == job_id]
                for w in queued:
                    self._unqueue(w)
            run = self._runs.pop(job_id, None)
            if run is not None:
                self._active = [g for g in self._active if g.job_id != job_id]
                run.program.close()
            if queued or run is not None:
                self.listener.on_cancelled(job_id)

    def _admit(self) -> None:
        """Jobs join in queue order while the policy lets them and their rows fit (the head also when
        nothing runs, however wide it is). Under "step", when the head must wait for rows, a later job
        may go first if that cannot delay the head (EASY backfilling): it ends before enough rows free
        up for the head, or it only takes rows the head will not need then."""
        opening = not self._active  # request policy: only a batch formed from empty takes jobs
        while True:
            with self._cond:
                work = self._next_work(opening)
                if work is None:
                    return
                self._unqueue(work)
                self._admitting = work.job_id
            try:
                run = Run(
                    work=work,
                    program=programs.PROGRAMS[work.kind](self.ctx, work),
                    steps=programs.total_steps(self.ctx, work),
                )
                self.listener.on_started(work.job_id, run.steps)
                self._runs[work.job_id] = run
                self._enter_phase(run, next(run.program))
            except (ValueError, KeyError) as e:  # its parameters cannot make a chain: it fails alone
                reason = f"parameter {e} is missing" if isinstance(e, KeyError) else e
                self._fail(work.job_id, "invalid_job", f"could not start: {reason}")
            except Exception as e:  # anything else in its set-up (memory, the device): likewise, logged
                self._job_error(work.job_id, e)
            finally:
                self._admitting = None

    def _unqueue(self, work: Work) -> None:
        """Take `work` out of the queue, by identity (Work equality would compare arrays)."""
        for i, queued in enumerate(self._queue):
            if queued is work:
                del self._queue[i]
                return

    def _next_work(self, opening: bool) -> Work | None:
        """The queued job to admit now, if any (called holding the lock)."""
        if not self._queue:
            return None
        head = self._queue[0]
        if not self._active or self._may_join(head, opening):
            return head
        if self.policy != "step":
            return None
        shadow, spare = self._head_start(rows_needed(head))
        for work in list(self._queue)[1:]:
            rows = rows_needed(work)
            if self._may_join(work, opening) and (rows <= spare or _steps(self.ctx, work) <= shadow):
                return work
        return None

    def _head_start(self, head_rows: int) -> tuple[int, int]:
        """(steps until enough rows are free for the head, rows free then beyond the head's), if the
        running jobs go on as planned and none joins."""
        free = self.max_batch - self.reserved
        shadow = 0
        for run in sorted(self._runs.values(), key=lambda r: r.steps - r.step):
            if free >= head_rows:
                break
            free += rows_needed(run.work)
            shadow = run.steps - run.step
        return shadow, max(0, free - head_rows)

    @property
    def reserved(self) -> int:
        """Rows the admitted jobs hold at their widest phase (a job's phases can differ in width)."""
        return sum(rows_needed(run.work) for run in self._runs.values())

    def _may_join(self, work: Work, opening: bool) -> bool:
        """Whether `work` may join the running batch under the policy."""
        if self.policy == "serial" or (self.policy == "request" and not opening):
            return False
        return self.reserved + rows_needed(work) <= self.max_batch

    def _enter_phase(self, run: Run, groups: list[Group]) -> None:
        with torch.inference_mode():  # each chain's step table now: one that cannot be made fails its job
            for g in groups:
                if isinstance(g, ChainGroup):
                    g.table(self.schedule)
        run.groups = groups
        self._active.extend(groups)

    def _iterate(self) -> None:
        started = time.perf_counter()
        active = list(self._active)
        try:
            with torch.inference_mode():
                rows = sum(g.rows for g in active)
                padded = self.forward.bucket(rows)
                x = self.buffers.gather("x", [g.model_input(self.schedule) for g in active], padded)
                t = self.buffers.gather("t", [g.rows_t(self.schedule) for g in active], padded)
                eps = self.forward(x, t)[:rows]
                self.forwards += 1
                previews = self._update(active, x[:rows], eps)
        except Exception as e:  # the batch fails, the engine goes on
            job_ids = sorted({g.job_id for g in active})
            log.exception("engine %s: step failed; failing job(s) %s", self.name, ", ".join(job_ids))
            for job_id in job_ids:
                self._fail(job_id, "engine_error", redacted("the engine failed on this step", e, job_id))
            return
        ENGINE_FORWARDS.labels(self.name).inc()
        ENGINE_BATCH_SIZE.labels(self.name).observe(rows)
        self._advance_runs(active, previews)
        ENGINE_STEP_SECONDS.labels(self.name).observe(time.perf_counter() - started)

    def _update(self, active: list[Group], x: Tensor, eps: Tensor) -> dict[Group, tuple[Tensor, Tensor]]:
        """Apply every row's own update; returns each group's (x_t, x̂₀) for previews."""
        sizes = [g.rows for g in active]
        xs, epss = x.split(sizes), eps.split(sizes)
        out: dict[Group, tuple[Tensor, Tensor]] = {}
        chains = [i for i, g in enumerate(active) if isinstance(g, ChainGroup)]
        if chains:
            groups = [g for g in active if isinstance(g, ChainGroup)]
            every = len(chains) == len(active)
            gather = self.buffers.gather
            x_prev, pred_x0 = self._step(
                x if every else gather("x_chains", [xs[i] for i in chains]),
                eps if every else gather("eps_chains", [epss[i] for i in chains]),
                gather("z", [g.noise.randn() for g in groups]),
                gather("coef", [g.rows_coef(self.schedule) for g in groups]),
            )
            for g, xp, x0, xt in zip(
                groups,
                x_prev.split([g.rows for g in groups]),
                pred_x0.split([g.rows for g in groups]),
                [xs[i] for i in chains],
                strict=True,
            ):
                g.advance(xp)
                out[g] = (xt, x0)
        for i, g in enumerate(active):
            if isinstance(g, BoundGroup):
                out[g] = g.record(self.schedule, epss[i])
        return out

    def _advance_runs(self, active: list[Group], previews: dict[Group, tuple[Tensor, Tensor]]) -> None:
        for run in {self._runs[g.job_id] for g in active if g.job_id in self._runs}:
            try:
                self._report(run, previews)
            except Exception as e:  # its previews (a device error surfacing at .cpu()): this job fails
                self._job_error(run.job_id, e)
                continue
            if all(g.remaining == 0 for g in run.groups):
                self._next_phase(run)
        self._active = [g for g in self._active if g.remaining > 0 and g.job_id in self._runs]

    def _report(self, run: Run, previews: dict[Group, tuple[Tensor, Tensor]]) -> None:
        run.step += 1
        t = max(g.plan_t[g.pos - 1] for g in run.groups if g in previews)  # the longest chain's
        every = run.stream_every
        if every and (run.step % every == 0 or run.step == run.steps):
            # Every image of the phase, in order: a shorter chain that has ended (interpolation at
            # several t) shows its result, so a preview always holds one image per image.
            shown = [previews.get(g) or (g.result, g.result) for g in run.groups]
            xt = torch.cat([x for x, _ in shown]).float().cpu()
            x0 = torch.cat([x for _, x in shown]).float().cpu()
            self.listener.on_progress(run.job_id, run.step, run.steps, t, x0, xt)
            run.reported = time.monotonic()
        elif time.monotonic() - run.reported >= PROGRESS_INTERVAL:  # a cheap report, no images
            self.listener.on_progress(run.job_id, run.step, run.steps, t, None, None)
            run.reported = time.monotonic()

    def _next_phase(self, run: Run) -> None:
        results = [g.result for g in run.groups]
        try:
            if not all(bool(torch.isfinite(r).all()) for r in results):
                raise JobFailed("non_finite", "the model produced NaN or infinite values")
            self._enter_phase(run, run.program.send(results))
        except StopIteration as done:
            self._finish(run, *done.value)
        except JobFailed as e:
            self._fail(run.job_id, e.code, str(e))
        except Exception as e:
            self._job_error(run.job_id, e)

    def _finish(self, run: Run, images: Tensor, extra: dict) -> None:
        try:
            images = images.float().cpu()
        except Exception as e:  # a device error surfacing at the copy: this job fails
            self._job_error(run.job_id, e)
            return
        self._runs.pop(run.job_id, None)
        self.listener.on_finished(run.job_id, images, extra)

    def _job_error(self, job_id: str, error: Exception) -> None:
        """Fail one job for an exception its own code raised (logged with its traceback)."""
        log.error("job %s failed: %s", job_id, traceback.format_exc())
        self._fail(job_id, "job_error", redacted("this job failed in the engine", error, job_id))

    def _fail(self, job_id: str, code: str, message: str) -> None:
        # Not the message: it may quote the job's parameters. The code says what went wrong.
        log.warning("engine %s: job %s failed: %s", self.name, job_id, code)
        run = self._runs.pop(job_id, None)
        if run is not None:
            self._active = [g for g in self._active if g.job_id != job_id]
            run.program.close()
        self.listener.on_failed(job_id, code, message)
