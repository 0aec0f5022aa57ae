"""Request and response bodies of API.md, with the limits and descriptions that /openapi.json publishes.

Requests are strict (no "4" for 4, no unknown fields) so that a typo is a 422 naming the field rather
than a silently ignored option. Limits that depend on the model or on server settings (steps ≤ T,
n ≤ max_images) are checked by the routes, which answer with the same 422 shape.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, WithJsonSchema, model_validator
from pydantic.json_schema import SkipJsonSchema

MAX_SEED = 2**63 - 1
# Largest |value| accepted in a given x_T (`latents` of POST /sample). x_T ~ N(0, I) hardly ever leaves
# ±6; the bound is generous so that any scaled or hand-made start passes, while values that only
# overflow the sampler into a `non_finite` failure (1e30, …) are refused up front with a 422.
MAX_LATENT_ABS = 1e3
Sampler = Literal["ddpm", "ddim"]
Output = Literal["png", "npy"]
Kind = Literal["sample", "interpolate", "reconstruct", "likelihood"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]

_MODEL = Field(
    None, max_length=200, description="model name from GET /models; default: the server's default model"
)
_SEED = Field(None, ge=0, le=MAX_SEED, description="random seed; random when omitted (the job reports it)")
_PREVIEWS = (
    "publish an x̂₀ preview on /stream every k steps (0: none); raised when needed so that one job keeps "
    "at most max_preview_events previews (server setting, default 200): the job's params show the k used"
)
_STREAM_EVERY = Field(10, ge=0, le=100_000, description=_PREVIEWS)
_STREAM_EVERY_OFF = Field(0, ge=0, le=100_000, description=_PREVIEWS)
_T = (
    "1..T of the model: how far to diffuse before the reverse process (default: T // 2, or "
    "DDPM_MAX_STEPS if the server allows fewer steps)"
)
_OUTPUT = Field("png", description="format of the result image URLs: 8-bit PNG or float32 .npy")


class Request(BaseModel):
    """Base of every request body: strict types and no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


def exactly_one(first: str, first_type: str, second: str, second_type: str) -> dict[str, Any]:
    """JSON Schema for "exactly one of two optional fields" (null counts as absent), so that
    /openapi.json states the rule the model validator enforces."""
    return {
        "oneOf": [
            {"required": [first], "properties": {first: {"type": first_type}, second: {"type": "null"}}},
            {"required": [second], "properties": {second: {"type": second_type}, first: {"type": "null"}}},
        ]
    }


# Errors


class ErrorInfo(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. validation_error, not_found")
    message: str = Field(description="what went wrong and what to change")
    details: list[dict[str, Any]] | None = Field(
        None, description="for 422: one {field, message} per problem"
    )


class ErrorResponse(BaseModel):
    error: ErrorInfo


# Jobs


class Progress(BaseModel):
    step: int = Field(description="denoising steps done")
    steps: int = Field(description="denoising steps in total (0 until the job starts)")


class JobUrls(BaseModel):
    self: str = Field(description="GET: this job")
    stream: str = Field(description="GET: Server-Sent Events with progress previews")


class ImageRef(BaseModel):
    url: str = Field(description="download URL of one result image (.png or .npy per the request's output)")


class ImagesResult(BaseModel):
    """Result of sample, interpolate and reconstruct jobs."""

    model_config = ConfigDict(extra="allow")

    images: list[ImageRef] = Field(description="one entry per image, in order")
    grid_url: str = Field(description="all images tiled into one PNG")
    npy_url: str = Field(description="all images as one float32 .npy of shape (n, C, H, W) in [-1, 1]")
    rows: int | None = Field(None, description="interpolate: grid rows, one per t")
    columns: int | None = Field(None, description="interpolate: grid columns, one per λ")


class LikelihoodTerms(BaseModel):
    prior: list[float] = Field(description="L_T per image, bits/dim")
    diffusion: list[float] = Field(description="Σ L_{t-1} per image, bits/dim")
    decoder: list[float] = Field(description="L_0 per image (discretized Gaussian decoder), bits/dim")


class LikelihoodCurve(BaseModel):
    t: list[int] = Field(description="timesteps 1..T")
    rate: list[list[float]] = Field(
        description="per image, per t: bits/dim received by the time x_t is, from x_T down "
        "(L_T + Σ_{s>t} L_{s-1}); at t = 1 the paper's rate (Table 2), the bound without L_0"
    )
    distortion: list[list[float]] = Field(
        description="per image, per t: RMSE of x̂₀ predicted from x_t, on the 0–255 scale"
    )


class LikelihoodResult(BaseModel):
    """Result of likelihood jobs."""

    model_config = ConfigDict(extra="allow")

    bits_per_dim: list[float] = Field(description="the variational bound per image, bits/dim")
    terms: LikelihoodTerms
    curve: LikelihoodCurve | None = Field(None, description="with curve: true, Fig. 5's curves")


class JobError(BaseModel):
    code: str
    message: str


class Job(BaseModel):
    """A generation job (GET /jobs/{id}); the same object is the `data` of the stream's `done` event."""

    id: str = Field(description="unguessable job id")
    kind: Kind
    model: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queue_position: int | None = Field(description="1-based place in the model's queue while queued")
    progress: Progress
    seed: int | None = Field(description="the seed actually used")
    params: dict[str, Any] = Field(description="the validated request, defaults filled in")
    result: ImagesResult | LikelihoodResult | None = Field(description="set when the job succeeded")
    error: JobError | None = Field(description="set when the job failed")
    urls: JobUrls


class ProgressEvent(BaseModel):
    """`data` of a `progress` event on GET /stream/{id}."""

    step: int
    steps: int
    t: int = Field(description="the timestep just denoised")
    x0: list[str] = Field(description="base64 PNG of the current x̂₀ prediction, one per image")
    xt: list[str] | None = Field(None, description="base64 PNG of x_t, one per image (only with ?xt=true)")


# POST /sample


class SampleRequest(Request):
    """Unconditional sampling: Algorithm 2 of Ho et al. 2020 (sampler "ddpm") or DDIM."""

    model: str | None = _MODEL
    n: int = Field(1, ge=1, le=4096, description="number of images, 1..max_images (server setting)")
    steps: int | None = Field(
        None,
        ge=1,
        description="reverse steps, 1..T (default T, or DDPM_MAX_STEPS if the server allows fewer); fewer "
        "use the trailing timesteps",
    )
    sampler: Sampler = Field("ddpm", description="ddpm (ancestral, Algorithm 2) or ddim")
    eta: float = Field(
        0.0, ge=0.0, le=1.0, description="DDIM η (ddim only): 0 deterministic, 1 ancestral-like"
    )
    variance: Literal["beta", "posterior", "model"] = Field(
        "model", description="DDPM σ²: beta (β_t), posterior (β̃_t) or the checkpoint's (ddpm only)"
    )
    clip_denoised: bool = Field(True, description="clip x̂₀ to [-1, 1] inside each step")
    seed: int | None = _SEED
    latents: str | None = Field(
        None,
        description=(
            "base64 .npy, float32 (n, C, H, W): the x_T to start from (default: from the seed); finite "
            f"values within ±{MAX_LATENT_ABS:g} (x_T ~ N(0, I), so larger ones are surely a mistake)"
        ),
    )
    stream_every: int = _STREAM_EVERY
    output: Output = _OUTPUT

    @model_validator(mode="after")
    def _sampler_options(self) -> SampleRequest:
        if self.sampler == "ddpm" and self.eta != 0:
            raise ValueError("eta applies to sampler 'ddim' only")
        if self.sampler == "ddim" and self.variance != "model":
            raise ValueError("variance applies to sampler 'ddpm' only (DDIM's σ comes from eta)")
        return self


# POST /interpolate, /reconstruct, /likelihood

_T_OR_LIST = {
    "anyOf": [
        {"type": "integer", "minimum": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1},
        {"type": "null"},
    ]
}
Lambda = Annotated[float, Field(ge=0.0, le=1.0)]


# `index` picks an image of a job; sent with an image or a seed it would mean nothing. The image and
# seed sources take it (hidden from the schema, whatever its value) only so that the route can refuse
# it as "a.index" with the reason, rather than pydantic's "a.image.index: Extra inputs are not permitted".
STRAY_INDEX = 'is only meaningful with job ({"job": id, "index": k}), which picks an image of that job'


def _stray_index() -> Any:
    return Field(None, exclude=True)


class ImageSource(Request):
    """An uploaded image."""

    image: str = Field(description="base64 PNG/JPEG/WebP of the model's resolution and channels")
    index: SkipJsonSchema[Any] = _stray_index()


class SeedSource(Request):
    """A fresh sample (all T steps of Algorithm 2) drawn with this seed."""

    seed: int = Field(ge=0, le=MAX_SEED, description="use a fresh sample drawn with this seed")
    index: SkipJsonSchema[Any] = _stray_index()


class JobImageSource(Request):
    """An image of a finished job of yours, on the same model (its exact float values)."""

    job: str = Field(description="id of a succeeded job of yours")
    index: int = Field(0, ge=0, description="which of its images (0-based)")


def _source_kind(value: Any) -> str | None:
    keys = value if isinstance(value, dict) else vars(value) if isinstance(value, BaseModel) else {}
    return next((key for key in ("image", "seed", "job") if key in keys), None)


Source = Annotated[
    Annotated[ImageSource, Tag("image")]
    | Annotated[SeedSource, Tag("seed")]
    | Annotated[JobImageSource, Tag("job")],
    Discriminator(
        _source_kind,
        custom_error_type="invalid_source",
        custom_error_message='expected {"image": b64}, {"seed": s} or {"job": id, "index": k}',
    ),
]


class InterpolateRequest(Request):
    """Interpolation in latent space at a chosen t (§4.3, Fig. 8–9 of Ho et al. 2020)."""

    model_config = ConfigDict(json_schema_extra=exactly_one("lambdas", "array", "num", "integer"))

    model: str | None = _MODEL
    a: Source
    b: Source
    # One t or a list; plain ints here so that an out-of-range t gets the route's message naming T.
    t: Annotated[int | list[int] | None, WithJsonSchema(_T_OR_LIST)] = Field(
        None, description=f"{_T}; or several t for coarse-to-fine rows (Fig. 9), one grid row each"
    )
    lambdas: Annotated[list[Lambda], Field(min_length=1, max_length=256)] | None = Field(
        None, description="mixing weights in [0, 1], one grid column each (give lambdas or num)"
    )
    num: int | None = Field(
        None, ge=2, le=256, description="instead of lambdas: this many weights evenly spread over [0, 1]"
    )
    steps: int | None = Field(
        None, ge=1, description="reverse steps from each t, 1..min(t) (default: every step t..1)"
    )
    seed: int | None = _SEED
    stream_every: int = _STREAM_EVERY_OFF
    output: Output = _OUTPUT

    @model_validator(mode="after")
    def _one_spread(self) -> InterpolateRequest:
        if (self.lambdas is None) == (self.num is None):
            raise ValueError("give exactly one of lambdas or num")
        return self


def _image_or_job() -> dict[str, Any]:
    schema = exactly_one("image", "string", "job", "string")
    schema["oneOf"][0]["not"] = {"required": ["index"]}  # index picks an image of `job` only
    return schema


class ReconstructRequest(Request):
    """Stochastic reconstructions sharing one x_t (Fig. 7 of Ho et al. 2020)."""

    model_config = ConfigDict(json_schema_extra=_image_or_job())

    model: str | None = _MODEL
    image: str | None = Field(None, description="base64 PNG/JPEG/WebP (or give job and index)")
    job: str | None = Field(None, description="id of a succeeded job of yours, on the same model")
    index: int = Field(0, ge=0, description="which image of `job` (0-based); only with job, not with image")
    t: int | None = Field(None, ge=1, description=_T)
    n: int = Field(4, ge=1, le=4096, description="independent reverse runs, 1..max_images")
    seed: int | None = _SEED
    stream_every: int = _STREAM_EVERY_OFF
    output: Output = _OUTPUT

    @model_validator(mode="after")
    def _one_source(self) -> ReconstructRequest:
        if (self.image is None) == (self.job is None):
            raise ValueError("give exactly one of image or job")
        return self


class LikelihoodRequest(Request):
    """The variational bound in bits/dim (Table 1, Fig. 5 of Ho et al. 2020)."""

    model: str | None = _MODEL
    images: list[str] = Field(
        min_length=1, max_length=4096, description="base64 PNG/JPEG/WebP images, 1..max_images"
    )
    seed: int | None = _SEED
    curve: bool = Field(False, description="also return per-t rate (bits) and distortion (RMSE, 0–255)")


# Models and health


class ModelInfo(BaseModel):
    name: str
    default: bool = Field(description="used when a request names no model")
    resolution: int = Field(description="image height and width in pixels")
    channels: int
    timesteps: int = Field(description="T, the number of diffusion steps it was trained with")
    max_steps: int = Field(
        description="the most steps a request may run on it, and the largest t (T, or DDPM_MAX_STEPS if less)"
    )
    beta_schedule: str = Field(
        description="linear, scaled_linear, cosine (squaredcos_cap_v2 in diffusers' configs) or trained"
    )
    variance: Literal["beta", "posterior"] = Field(description="the checkpoint's default DDPM σ²")
    parameters: int
    source: str = Field(description="where it was loaded from")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    models: list[str]
