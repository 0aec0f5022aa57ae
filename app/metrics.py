"""Every Prometheus metric of the service, created once at import on the default registry.

Module-level objects, so building the app several times in one process (tests) never registers a
metric twice. The engine imports its `ENGINE_*` metrics from here; the API and job runner the rest.
"""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)

# API.md: every name on /metrics starts with `ddpm_`. The client library's default collectors do not
# (process_*, python_info, python_gc_*): keep the process figures (CPU seconds, resident memory, open
# file descriptors, start time) as ddpm_process_*, drop the interpreter's.
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.unregister(_collector)
ProcessCollector(namespace="ddpm")

# Seconds, from a fast API answer to a long `?wait=true` or SSE stream.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
# Seconds, from a few DDIM steps on a GPU to a full 1000-step chain on a CPU.
_JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

HTTP_REQUEST_SECONDS = Histogram(
    "ddpm_http_request_duration_seconds",
    "HTTP request latency, by route template, method (GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH or "
    "other) and status code (499: the client went away before an answer)",
    ["route", "method", "status"],
    buckets=_LATENCY_BUCKETS,
)
# The `method` label's values: any other token a client sends (uvicorn accepts any) counts as "other",
# so that requests, authenticated or not, cannot create series at will.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
# The `status` of a request whose client disconnected before any answer was sent (nginx's code).
CLIENT_CLOSED_REQUEST = 499
QUEUE_WAIT_SECONDS = Histogram(
    "ddpm_queue_wait_seconds",
    "Time from a job's creation to its first denoising step, by kind",
    ["kind"],
    buckets=_JOB_BUCKETS,
)
JOB_SECONDS = Histogram(
    "ddpm_job_duration_seconds",
    "Time from a job's first step to its end, by kind",
    ["kind"],
    buckets=_JOB_BUCKETS,
)
JOBS = Counter(
    "ddpm_jobs",
    "Jobs that ended, by kind and outcome; each counted once, by the process that recorded its end "
    "(the API, or the worker that ran it)",
    ["kind", "outcome"],
)
IMAGES = Counter("ddpm_images", "Images produced by succeeded jobs, by model", ["model"])
MODEL_LOAD_SECONDS = Gauge("ddpm_model_load_seconds", "Seconds it took to load each model", ["model"])
DEVICE_MEMORY_BYTES = Gauge(
    "ddpm_device_memory_bytes", "Accelerator memory held by tensors (torch.cuda.memory_allocated)", ["device"]
)
SSE_STREAMS = Gauge("ddpm_sse_streams", "Open /stream connections")
WAITING_REQUESTS = Gauge(
    "ddpm_waiting_requests", "POSTs holding their answer until their job ends (?wait=true, Prefer: wait)"
)

ENGINE_STEP_SECONDS = Histogram(
    "ddpm_engine_step_seconds",
    "Wall time of one engine iteration (one batched U-Net forward and the per-row updates)",
    ["model"],
    # A few ms (a small batch on a GPU) to minutes (4096 rows of a large model on a CPU), up to the
    # default DDPM_ENGINE_STALL_SECONDS (600), past which a step counts as hung.
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
ENGINE_BATCH_SIZE = Histogram(
    "ddpm_engine_batch_size",
    "Rows in each U-Net forward",
    ["model"],
    buckets=tuple(2**i for i in range(13)),  # 1, 2, 4, …, 4096: every DDPM_MAX_BATCH allowed
)
ENGINE_SLOTS = Gauge("ddpm_engine_slots", "Image slots by state (running | waiting)", ["model", "state"])
ENGINE_FORWARDS = Counter("ddpm_engine_forwards", "U-Net forward passes", ["model"])


def update_device_memory(device: str | None = None) -> None:
    """Refresh the device-memory gauge: for every CUDA device (the API, at scrape time), or for `device`
    only (a worker, every heartbeat: `cuda` means the current device). A no-op without CUDA and for a
    device that is not a CUDA one."""
    if device is not None and not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        return
    if device is None:
        indices = list(range(torch.cuda.device_count()))
    else:
        index = torch.device(device).index
        indices = [torch.cuda.current_device() if index is None else index]
    for index in indices:
        DEVICE_MEMORY_BYTES.labels(device=f"cuda:{index}").set(torch.cuda.memory_allocated(index))


# Distributed mode: the queues (refreshed by each worker every heartbeat) and what workers do with them.
QUEUE_WAITING = Gauge(
    "ddpm_queue_waiting",
    "Jobs queued and not yet claimed by any worker, by model; set by each worker every heartbeat and by "
    "each API replica every refresh (so it is there with no worker up): take the max over targets",
    ["model"],
)
QUEUE_LAG = Gauge(
    "ddpm_queue_lag",
    "Consumer-group lag of the model's queue stream (what KEDA scales workers on)",
    ["model"],
)
QUEUE_PENDING = Gauge(
    "ddpm_queue_pending", "Jobs claimed by workers and not yet acknowledged (in flight), by model", ["model"]
)
WORKER_CLAIMED = Gauge("ddpm_worker_claimed_jobs", "Jobs this worker holds (running or about to)", ["model"])
RECLAIMS = Counter(
    "ddpm_worker_reclaims", "Queue entries this worker took over from a dead or stalled worker", ["model"]
)
DEAD_LETTERS = Counter(
    "ddpm_worker_dead_letters",
    "Jobs failed and moved to the dead-letter stream after too many deliveries",
    ["model"],
)
DUPLICATE_ENDS = Counter(
    "ddpm_worker_duplicate_ends",
    "Jobs this worker finished that another worker had already ended as succeeded or failed (after a "
    "takeover): nothing was stored. A job its client cancelled meanwhile is not one",
    ["model"],
)
