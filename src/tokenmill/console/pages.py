"""Serves the console: `/` is the single page (it routes by the URL's fragment, so there is one HTML file),
`/console/...` its assets. Assets are files of this package, served from disk with ETags, so the console
works with no network beyond this server."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"

# The page and its scripts come only from this server; styles may be set from script (charts do), images
# may be data: URLs (chart exports), and the API is same-origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


async def _index(_: Request) -> Response:
    response = FileResponse(STATIC_DIR / "index.html", media_type="text/html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"
    return response


def routes() -> list[BaseRoute]:
    return [
        Route("/", _index, methods=["GET", "HEAD"], include_in_schema=False),
        Mount("/console", app=StaticFiles(directory=STATIC_DIR), name="console"),
    ]
