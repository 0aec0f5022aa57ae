"""GET /: the web page, plain HTML, CSS and JavaScript from app/api/static (no build step, nothing external).

The page is a client of the API like any other, so its routes stay out of /openapi.json. Its
Content-Security-Policy lets it load and call nothing but this server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.api.errors import ApiError

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {
    "api.js": "text/javascript",
    "png.js": "text/javascript",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
# X-Content-Type-Options: nosniff is on every response of the app (app/api/middleware.py; errors.py for
# the 500s), not on uvicorn's own answers to malformed requests.
HEADERS = {
    "Cache-Control": "no-cache",  # revalidate (ETag), so a new deployment shows at once
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    """The page: sample, interpolate and reconstruct, watching x̂₀ form."""
    headers = {**HEADERS, "Content-Security-Policy": CSP}
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=headers)


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    """The page's scripts and stylesheet; nothing else under static/ is served."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", f"no static file {name[:100]!r}; the page is at /")
    return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)
