"""Request dependencies as `Annotated` aliases: settings, job store, job service and the caller's identity.

Authentication: with `DDPM_API_KEYS` set, every job route needs `Authorization: Bearer <key>` or
`X-API-Key: <key>`. The presented key is compared with every configured key in constant time (digests
of equal length, no early exit), and the caller is known by a hash of it: jobs record that hash as
their owner, so no key is ever stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Annotated

from fastapi import Depends, Header, Query, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.api.errors import ApiError
from app.api.service import JobService
from app.jobs import JobStore
from app.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="an API key, when the server has DDPM_API_KEYS set")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="alternative to the bearer header")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_matches(presented: str, keys: list[str]) -> bool:
    """Whether `presented` is one of `keys`, taking the same time whichever key (if any) it matches."""
    digest = _digest(presented)
    found = False
    for key in keys:
        found |= hmac.compare_digest(digest, _digest(key))
    return found


def owner_of(key: str) -> str:
    """The owner id recorded on jobs made with `key`."""
    return hashlib.sha256(b"ddpm-serve owner\0" + key.encode("utf-8")).hexdigest()


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_service(request: Request) -> JobService:
    service: JobService | None = request.app.state.service
    if service is None:
        raise ApiError(
            503, "not_ready", "the models are still loading; retry shortly", headers={"Retry-After": "5"}
        )
    return service


def get_owner(
    settings: Annotated[Settings, Depends(get_settings)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> str | None:
    """The caller's owner id; None when authentication is off. Raises 401 for a missing or wrong key."""
    if not settings.api_keys:
        return None
    presented = bearer.credentials if bearer is not None else api_key
    challenge = {"WWW-Authenticate": "Bearer"}
    if not presented:
        raise ApiError(
            401,
            "unauthorized",
            "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers=challenge,
        )
    if not key_matches(presented, settings.api_keys):
        raise ApiError(401, "unauthorized", "wrong API key", headers=challenge)
    return owner_of(presented)


async def authenticate(request: Request) -> None:
    """`get_owner` outside dependency injection, for the handlers of bodies FastAPI could not parse: it
    parses a body before it runs the route's dependencies, and a caller without a valid key should hear
    401 first whatever it sent. Raises the same 401s."""
    get_owner(get_settings(request), await _bearer(request), await _api_key(request))


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
ServiceDep = Annotated[JobService, Depends(get_service)]
OwnerDep = Annotated[str | None, Depends(get_owner)]


def _prefer_wait(prefer: str | None) -> float | None:
    """Seconds from an RFC 7240 `Prefer: wait=N` header (other preferences and bad values are ignored)."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.split(";", 1)[0].partition("=")
        seconds = value.strip()
        if name.strip().lower() == "wait" and seconds.isascii() and seconds.isdigit():  # not "²"
            return float(seconds)
    return None


def get_wait(
    wait: Annotated[
        bool, Query(description="hold the request until the job ends, then answer 200 with the final job")
    ] = False,
    prefer: Annotated[
        str | None, Header(description="RFC 7240 `wait=N`: hold the request up to N seconds, then answer 200")
    ] = None,
) -> float | None:
    """How long a POST holds its answer: None = answer 202 at once; math.inf = until the job ends."""
    seconds = _prefer_wait(prefer)
    if seconds is not None:
        return seconds
    return math.inf if wait else None


WaitDep = Annotated[float | None, Depends(get_wait)]
