"""One error shape for every failure: `{"error": {"code": …, "message": …}}` (API.md, Errors).

Routes raise `ApiError` (or one of its named subclasses); FastAPI's own validation and routing errors
and anything unexpected are converted here too, so a client never sees another shape. A bug is a 500
with a generic message (and a logged traceback); input a client sent never reaches that path.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "not_ready",
}
# FastAPI's 400 for a body its JSON parser gave up on other than by a syntax error: bytes that are not
# UTF-8, an integer of more than 4,300 digits, nesting deeper than the recursion limit.
_UNPARSABLE_BODY = "There was an error parsing the body"
_NOT_JSON = "the request body is not valid JSON"
_NOT_AN_OBJECT = "the request body must be a JSON object, sent with Content-Type: application/json"
Authenticate = Callable[[Request], Awaitable[None]]  # raises the 401 of a missing or wrong API key


class ApiError(Exception):
    """An error answer: HTTP status, a stable machine-readable code and a message a person can act on."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        details: Any = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.details = details


def not_found(what: str) -> ApiError:
    what = what if len(what) <= 100 else what[:97] + "…"  # ids come from the client: do not echo megabytes
    return ApiError(404, "not_found", f"{what} not found (unknown, expired, or made with another API key)")


def invalid(field: str, message: str) -> ApiError:
    """A 422 for one request field, shaped like FastAPI's own validation errors."""
    return ApiError(
        422, "validation_error", f"{field}: {message}", details=[{"field": field, "message": message}]
    )


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


def error_response(error: ApiError) -> JSONResponse:
    # nosniff here too: the 500 handler answers outside the middleware that adds it to every other answer
    headers = {"X-Content-Type-Options": "nosniff", **(error.headers or {})}
    return JSONResponse(
        error_body(error.code, error.message, error.details), status_code=error.status, headers=headers
    )


def _field(loc: Sequence[Any]) -> str:
    # ("body", "n") -> "n"; ("query", "wait") -> "wait"; ("header", "last-event-id") -> "last-event-id"
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def _validation_message(error: Mapping[str, Any]) -> str:
    message = str(error.get("msg", "invalid value"))
    at_body = tuple(error.get("loc", ())) == ("body",)
    if error.get("type") == "json_invalid":
        return _NOT_JSON
    if error.get("type") == "missing" and at_body:
        return "a JSON object is required as the request body"
    if error.get("type") in ("model_attributes_type", "dict_type") and at_body:  # text/plain, a form, [1]
        return _NOT_AN_OBJECT
    return message.removeprefix("Value error, ")


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _unreadable_body(request: Request, authenticate: Authenticate) -> JSONResponse | None:
    """The 401 a caller without a valid key gets before any word on a body FastAPI could not parse
    (parsing precedes the route's dependencies, where the key is checked); None when the key is good."""
    try:
        await authenticate(request)
    except ApiError as e:
        return error_response(e)
    return None


async def _validation_error(request: Request, exc: Exception, authenticate: Authenticate) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors) and (
        refused := await _unreadable_body(request, authenticate)
    ):
        return refused
    details = [
        {
            "field": "body" if e.get("type") == "json_invalid" else _field(e.get("loc", ())),
            "message": _validation_message(e),
        }
        for e in errors
    ]
    message = "; ".join(f"{d['field']}: {d['message']}" for d in details) or "invalid request"
    return error_response(ApiError(422, "validation_error", message, details=details))


async def _http_error(request: Request, exc: Exception, authenticate: Authenticate) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:  # API.md keeps 400 for image data
        if refused := await _unreadable_body(request, authenticate):
            return refused
        message = f"{_NOT_JSON} (not UTF-8, a number too long, or nested too deep)"
        return error_response(invalid("body", message))
    code = _CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404 and message == "Not Found":
        message = "no such route; see /docs for the API"
    return error_response(ApiError(exc.status_code, code, message, headers=exc.headers))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ApiError(500, "internal", "internal server error; the server log has the details"))


def install_error_handlers(app: FastAPI, *, authenticate: Authenticate) -> None:
    """`authenticate(request)` raises the 401 for a missing or wrong API key (app/api/deps.py)."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, partial(_validation_error, authenticate=authenticate))
    app.add_exception_handler(StarletteHTTPException, partial(_http_error, authenticate=authenticate))
    app.add_exception_handler(Exception, _unexpected)
