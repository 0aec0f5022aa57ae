"""Service settings: one pydantic-settings class read from `DDPM_*` environment variables.

The field names are part of the deployment contract (compose file, Kubernetes manifests, `ddpm-serve
--help`); rename none. Validation refuses combinations that would make the service unsafe or unable to
keep API.md's promises, so a bad deployment fails at start-up instead of at the first request.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIN_API_KEY_LENGTH = 16
MAX_HEARTBEAT_SECONDS = 15.0  # API.md: "a comment heartbeat at least every 15 s"
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
        description="model references to load (folder, PRESET:WEIGHTS or hf:REPO), comma-separated or "
        "JSON; the first is the default; empty = the bundled MNIST model",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on")
    device: str = Field(
        "auto", description="torch device for the engines; auto = cuda if available, else cpu"
    )
    redis_url: str | None = Field(
        None,
        repr=False,  # may carry a password
        description="Redis URL for distributed mode (not implemented yet: setting it stops start-up)",
    )
    max_batch: int = Field(64, ge=1, le=4096, description="most image slots one engine denoises per step")
    max_images: int = Field(64, ge=1, le=4096, description="most images one request may ask for (n)")
    max_steps: int | None = Field(
        None,
        ge=1,
        description="most denoising steps per request; none = T of each model (likelihood and interpolation "
        "from seeds take T steps, so a smaller limit refuses them)",
    )
    max_preview_events: int = Field(
        200,
        ge=1,
        description="most x̂₀ previews one job keeps for /stream replay; a finer stream_every is coarsened",
    )
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="largest request body, in bytes")
    max_queued_jobs: int = Field(256, ge=1, description="queued jobs beyond which POSTs get 429")
    job_ttl_seconds: float = Field(3600.0, gt=0, description="seconds a job and its results are kept")
    max_streams_per_key: int = Field(8, ge=1, description="concurrent /stream connections per API key")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description=f"accepted API keys (comma-separated or JSON), each ≥ {MIN_API_KEY_LENGTH} "
        "characters; empty = no authentication",
    )
    heartbeat_seconds: float = Field(
        15.0, gt=0, le=MAX_HEARTBEAT_SECONDS, description="seconds between SSE comment heartbeats"
    )
    max_upload_pixels: int = Field(
        4096 * 4096, ge=1, description="Pillow decompression-bomb limit for uploaded images (pixels)"
    )
    log_level: str = Field("info", description=f"one of {', '.join(LOG_LEVELS)}")

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

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

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
