"""Service settings: one pydantic-settings class read from `DDPM_*` environment variables.

The field names are part of the deployment contract (compose file, Kubernetes manifests, `ddpm-serve
--help`); rename none. Validation refuses combinations that would make the service unsafe or unable to
keep API.md's promises, so a bad deployment fails at start-up instead of at the first request.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from app.engine.fastpath import FastPath

MIN_API_KEY_LENGTH = 16
# API.md: "a comment heartbeat at least every 15 s". A heartbeat falls due between other events and the
# event loop adds its own delay (gaps of 15.1-15.2 s were measured at 15), so the limit leaves a second.
MAX_HEARTBEAT_SECONDS = 14.0
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _split_list(value: Any) -> Any:
    """Lists from the environment: JSON (`["a", "b"]`) or comma-separated (`a,b`); empty means none."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a JSON list: {e}") from e
    return [item.strip() for item in text.split(",") if item.strip()]


class Settings(BaseSettings):
    """Everything an operator can set; each field is also `DDPM_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="DDPM_", extra="ignore", validate_default=True)

    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="model references to load (folder, PRESET:WEIGHTS or hf:REPO; NAME=REF names one), "
        "comma-separated or JSON; the first is the default; empty = the bundled MNIST model",
    )
    host: str = Field("127.0.0.1", description="address to listen on (the API; a worker's metrics port)")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on")
    device: str = Field(
        "auto", description="torch device for the engines; auto = cuda if available, else cpu"
    )
    redis_url: str | None = Field(
        None,
        repr=False,  # may carry a password
        description="Redis URL: distributed mode (stateless API, engines in ddpm-worker processes; "
        "docs/distributed.md); none = embedded (engines in this process)",
    )
    max_batch: int = Field(64, ge=1, le=4096, description="most image slots one engine denoises per step")
    engine_policy: Literal["step", "request", "serial"] = Field(
        "step",
        description="how jobs share an engine's batch: step = join between any two steps (continuous "
        "batching); request = join only an empty batch, and jobs admitted together finish together; "
        "serial = one job at a time. The same seeds give the same images under every policy",
    )
    channels_last: bool = Field(False, description="run the U-Net on NHWC (channels_last) activations")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="U-Net autocast dtype: bfloat16/float16 run convolutions and matmuls in 16 bits "
        "(float16 on CUDA only); ε, the update and the schedule stay float32/float64",
    )
    compile: bool = Field(
        False,
        description="torch.compile the U-Net (static shapes, batches padded to powers of two up to "
        "max_batch) and the per-row update; every size is compiled at start-up, which takes minutes",
    )
    cuda_graphs: bool = Field(
        False, description="replay one CUDA graph per batch size (as for compile), captured at start-up"
    )
    max_images: int = Field(64, ge=1, le=4096, description="most images one request may ask for (n)")
    max_steps: int | None = Field(
        None,
        ge=1,
        description="most denoising steps per request; none = T of each model (likelihood and interpolation "
        "from seeds take T steps, so a smaller limit refuses them; a request that names no steps or t gets "
        "at most this many)",
    )
    max_preview_events: int = Field(
        200,
        ge=1,
        description="most x̂₀ previews one job keeps for /stream replay; a finer stream_every is coarsened",
    )
    max_preview_bytes: int = Field(
        8 * 1024 * 1024,
        ge=0,
        description="bytes of preview images (base64 PNG) one job may store for /stream replay; x_t only "
        "within half of it; beyond it progress events carry no images (x0: []); 0 = previews without images",
    )
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="largest request body, in bytes")
    max_input_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1,
        description="most bytes of input images one request may decode to (n × C × H × W × 4, float32, kept "
        "with the job): small PNGs of flat images expand; beyond it 413",
    )
    max_queued_jobs: int = Field(256, ge=1, description="queued jobs beyond which POSTs get 429")
    max_queued_jobs_per_key: int | None = Field(
        None,
        ge=1,
        description="queued jobs of one API key beyond which its POSTs get 429, so one key cannot fill the "
        "queue for all; none = a quarter of max_queued_jobs (at least 1); without API keys it does not apply",
    )
    job_ttl_seconds: float = Field(
        3600.0,
        gt=0,
        description="seconds a job and its results are kept after it ends (a job that has not ended is "
        "kept however long it waits)",
    )
    max_streams_per_key: int = Field(
        8, ge=1, description="concurrent /stream connections per API key (without keys: per client address)"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description=f"accepted API keys (comma-separated or JSON), each ≥ {MIN_API_KEY_LENGTH} "
        "characters; empty = no authentication",
    )
    heartbeat_seconds: float = Field(
        10.0, gt=0, le=MAX_HEARTBEAT_SECONDS, description="seconds between SSE comment heartbeats"
    )
    max_upload_pixels: int = Field(
        4096 * 4096, ge=1, description="Pillow decompression-bomb limit for uploaded images (pixels)"
    )
    log_level: str = Field("info", description=f"one of {', '.join(LOG_LEVELS)}")
    # Distributed mode (DDPM_REDIS_URL set): workers and their queue.
    worker_name: str | None = Field(
        None,
        description="ddpm-worker: its consumer name in the queue group, unique per worker; none = HOST-PID",
    )
    worker_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="ddpm-worker: serve Prometheus /metrics on this port; none = off"
    )
    worker_heartbeat_seconds: float = Field(
        5.0,
        gt=0,
        description="ddpm-worker: seconds between heartbeats (liveness, in-flight jobs kept claimed)",
    )
    reclaim_idle_seconds: float = Field(
        60.0,
        gt=0,
        description="a job whose worker stopped heartbeating this long is taken over by another worker and "
        "restarted from scratch; at least 3 heartbeats",
    )
    max_deliveries: int = Field(
        3,
        ge=1,
        description="times a job is handed to a worker before it fails and goes to the dead-letter stream",
    )
    engine_stall_seconds: float = Field(
        600.0,
        ge=0,
        description="an engine in one step this long is hung (a stuck device call): ddpm-worker hands its "
        "jobs back and exits non-zero, to be restarted; ddpm-serve (embedded) answers /readyz 503; 0 = never",
    )
    worker_grace_seconds: float = Field(
        30.0,
        ge=0,
        description="ddpm-worker: on SIGTERM, seconds to finish running jobs before handing back the rest",
    )

    @field_validator("models", "api_keys", mode="before")
    @classmethod
    def _parse_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("models")
    @classmethod
    def _models_not_blank(cls, value: list[str]) -> list[str]:
        if any(not ref.strip() for ref in value):
            raise ValueError("model references must not be blank")
        return [ref.strip() for ref in value]

    @field_validator("api_keys")
    @classmethod
    def _keys_strong(cls, value: list[str]) -> list[str]:
        # A short key can be guessed online; a blank one would be accepted from any client.
        weak = [i for i, key in enumerate(value) if len(key) < MIN_API_KEY_LENGTH]
        if weak:
            raise ValueError(
                f"API keys must be at least {MIN_API_KEY_LENGTH} characters; "
                f"key(s) at position {', '.join(map(str, weak))} are shorter"
            )
        if len(set(value)) != len(value):
            raise ValueError("API keys must be distinct")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return level

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        # Checked here, so that a typo stops start-up in one line before any model loads.
        if value is None or not value.strip():
            return None
        from redis.connection import parse_url

        try:
            parse_url(value.strip())
        except ValueError as e:
            raise ValueError(f"not a Redis URL: {e}") from None  # the URL itself is not shown: a password
        return value.strip()

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        device = value.strip().lower()
        if device != "auto":
            import torch

            try:
                torch.device(device)
            except RuntimeError as e:
                raise ValueError(f"not a torch device: {value!r}") from e
        return device

    @model_validator(mode="after")
    def _heartbeats_fit_in_reclaim(self) -> Settings:
        # A live worker renews its claims every heartbeat: with fewer than 3 per reclaim period, one late
        # heartbeat would let another worker take over (and redo) a job that is still running.
        if self.reclaim_idle_seconds < 3 * self.worker_heartbeat_seconds:
            raise ValueError(
                f"reclaim_idle_seconds ({self.reclaim_idle_seconds}) must be at least 3 × "
                f"worker_heartbeat_seconds ({self.worker_heartbeat_seconds})"
            )
        return self

    @model_validator(mode="after")
    def _fast_paths_fit_the_device(self) -> Settings:
        # With device "auto" the engine checks again once the device is known (FastPath.check).
        if self.device == "cpu" and (self.cuda_graphs or self.dtype == "float16"):
            raise ValueError("cuda_graphs and dtype float16 need a CUDA device, and device is cpu")
        return self

    def fast_path(self) -> FastPath:
        """The engines' fast-path options (app/engine/fastpath.py)."""
        from app.engine.fastpath import FastPath

        return FastPath(
            channels_last=self.channels_last,
            dtype=self.dtype,
            compile=self.compile,
            cuda_graphs=self.cuda_graphs,
        )

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    def engine_device(self) -> str:
        """`resolved_device()`, checked: present on this machine, and able to run the fast path; a
        ValueError saying why not, before any model loads."""
        import torch

        device = self.resolved_device()
        if problem := unavailable(device):
            raise ValueError(f"DDPM_DEVICE {problem}")
        self.fast_path().check(torch.device(device))
        return device

    def resolved_device(self) -> str:
        """The torch device the engines use: `device`, with "auto" meaning CUDA when present."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def model_refs(self) -> list[str]:
        """The models to load, first = default; the bundled model when none are configured."""
        if self.models:
            return list(self.models)
        from app.cli import BUNDLED_MODEL

        return [str(BUNDLED_MODEL)]


def unavailable(device: str) -> str | None:
    """Why this machine cannot run torch device `device` ("cpu", "cuda", "cuda:N"), or None if it can."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        return f"{device!r} is not a torch device (cpu, cuda, cuda:N)"
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            return f"{device}: this machine has {count} CUDA device(s)"
    elif parsed.type != "cpu":
        return f"{device}: only cpu and cuda devices are supported"
    return None
